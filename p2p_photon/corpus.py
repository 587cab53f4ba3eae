"""Private corpora: read the formats people have, each with the library made for it, and tokenize
them with the run's tokenizer, streaming, into a per-peer cache.

Formats (`list_corpus`): a UTF-8 text file, a directory (every non-hidden file below it, sorted;
binary files are skipped and counted), ``.jsonl`` / ``.jsonl.gz`` (gzip) / ``.jsonl.zst``
(zstandard): one JSON object per line, the document in ``text_field``; ``.parquet`` (pyarrow):
the ``text_field`` column; a Hugging Face ``datasets`` dataset saved with ``save_to_disk``
(``datasets.load_from_disk``; every split of a DatasetDict, in sorted order).

`tokenize_corpus` writes ``{cache}/corpus-{key}/`` with ``train.bin`` and ``heldout.bin``
(uint16/uint32 little-endian token ids, ``<|endoftext|>`` after each document) and ``meta.json``;
the key hashes the corpus fingerprint (file names, sizes, mtimes), the tokenizer's sha256, the
text field, the held-out fraction and the seed. Document k is held out when a seeded hash of k
falls under ``heldout_fraction``: the peer's own held-out split, decided one document at a time so
that nothing has to be held in memory. Work goes to ``.partial-corpus-{key}/`` with a
``progress.json`` written after every batch (units read, bytes, tokens per split); an interrupted
run resumes from there (the shards are cut back to the recorded length), and the directory is
renamed into place only when complete. Memory is bounded by a few batches of text
(``BATCH_BYTES``) whatever the corpus size; reading runs in a thread beside the encoding (the
tokenizers library releases the GIL while it encodes).
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .files import sha256_file
from .ui import progress_bar

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EOS = "<|endoftext|>"
BATCH_BYTES = 4 << 20
"""Text per encode batch: memory is a few of these, whatever the corpus size."""
PIECE_CHARS = 64 * 1024
"""Long documents are read and encoded in pieces of about this many characters, cut at line breaks."""
_SNIFF = 8192
SUPPORTED = ("UTF-8 text files or a directory of them, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, "
             "or a datasets directory written by save_to_disk")
_NOT_TEXT = frozenset({".gz", ".zst", ".bz2", ".xz", ".zip", ".tar", ".tgz", ".7z", ".arrow", ".feather",
                       ".pdf", ".docx", ".xlsx", ".png", ".jpg", ".jpeg", ".gif", ".bin", ".pt", ".npy"})


class DataError(UserError):
    """A one-line, user-facing data error: names the problem and the fix."""


# ----------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    rel: str
    kind: str  # "text" | "jsonl" | "jsonl.gz" | "jsonl.zst" | "parquet" | "dataset"
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Corpus:
    root: Path
    files: tuple[CorpusFile, ...]
    skipped: int  # unknown formats inside a directory

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def fingerprint(self) -> str:
        """Stands in for the content: names, sizes and modification times."""
        listing = [(f.rel, f.kind, f.size, f.mtime_ns) for f in self.files]
        return hashlib.sha256(json.dumps([str(self.root), listing]).encode()).hexdigest()


def kind_of(path: Path) -> str | None:
    """The format a file's name says, 'text' for anything else that may be text, None for a known binary."""
    name = path.name.lower()
    for suffix, kind in ((".jsonl.gz", "jsonl.gz"), (".jsonl.zst", "jsonl.zst"), (".jsonl", "jsonl"),
                         (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    return None if path.suffix.lower() in _NOT_TEXT else "text"


def is_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def list_corpus(corpus: str | Path) -> Corpus:
    """The files of a corpus, in reading order; DataError for a missing path or an unknown format."""
    root = Path(corpus).expanduser().resolve()
    if not root.exists():
        raise DataError(f"data: corpus not found: {root} (give --data an existing file or directory)")
    if root.is_dir():
        return _walk(root)
    kind = kind_of(root)
    if kind is None or (kind == "text" and not _looks_like_text(root)):
        raise DataError(f"data: unknown corpus format: {root} (not UTF-8 text and not a known format); "
                        f"supported: {SUPPORTED}")
    return Corpus(root, (_entry(root, root.name, kind),), 0)


def _entry(path: Path, rel: str, kind: str) -> CorpusFile:
    if kind == "dataset":
        files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        stats = [p.stat() for p in files]
        return CorpusFile(path, rel, kind, sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats),
                                                                               default=0))
    st = path.stat()
    return CorpusFile(path, rel, kind, st.st_size, st.st_mtime_ns)


def _walk(root: Path) -> Corpus:
    if is_dataset_dir(root):
        return Corpus(root, (_entry(root, ".", "dataset"),), 0)
    files, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in [d for d in dirnames if is_dataset_dir(here / d)]:
            dirnames.remove(d)
            files.append(_entry(here / d, (here / d).relative_to(root).as_posix(), "dataset"))
        for name in sorted(n for n in filenames if not n.startswith(".")):
            path = here / name
            kind = kind_of(path)
            try:
                ok = kind is not None and (kind != "text" or _looks_like_text(path))
                if ok and path.stat().st_size > 0:
                    files.append(_entry(path, path.relative_to(root).as_posix(), kind))
                elif not ok:
                    skipped += 1
            except OSError as err:
                logger.warning("skipping unreadable file %s (%s)", path, err.strerror or err)
                skipped += 1
    files.sort(key=lambda f: f.rel)
    return Corpus(root, tuple(files), skipped)


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a character cut by the sniff window
    return True


# ----------------------------------------------------------------------------- reading


@dataclass
class ReadStats:
    bad_lines: int = 0  # JSONL lines that are not JSON objects
    missing_field: int = 0  # JSONL lines or rows without a string text field
    bytes: int = 0


@dataclass(frozen=True)
class Unit:
    """A piece of a document: `last` ends the document (EOS follows); `nbytes` of the input it consumed."""

    text: str
    doc: int
    last: bool
    nbytes: int


def iter_units(corpus: Corpus, text_field: str, stats: ReadStats) -> Iterator[Unit]:
    """Every document of the corpus, in order, as pieces of at most ~PIECE_CHARS characters."""
    doc = 0
    for f in corpus.files:
        for text, nbytes, last in _pieces_of(f, text_field, stats):
            yield Unit(text, doc, last, nbytes)
            doc += last


def _pieces_of(f: CorpusFile, text_field: str, stats: ReadStats) -> Iterator[tuple[str, int, bool]]:
    """(piece, input bytes, ends its document) for every document of one file."""
    if f.kind == "text":
        yield from _text_file(f.path)
        return
    if f.kind.startswith("jsonl"):
        docs = _jsonl(f, text_field, stats)
    elif f.kind == "parquet":
        docs = _parquet(f, text_field, stats)
    else:
        docs = _dataset(f, text_field, stats)
    for text, nbytes in docs:
        pieces = chunk_text(text, PIECE_CHARS)
        for k, piece in enumerate(pieces):
            yield piece, nbytes if k == 0 else 0, k == len(pieces) - 1


def _text_file(path: Path) -> Iterator[tuple[str, int, bool]]:
    """A text file is one document, read in blocks and cut at line breaks (never whole in memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = ""
    with open(path, "rb") as f:
        while block := f.read(PIECE_CHARS):
            carry += decoder.decode(block)
            cut = carry.rfind("\n")
            if cut >= 0 and len(carry) >= PIECE_CHARS // 2:
                yield carry[: cut + 1], len(block), False
                carry = carry[cut + 1 :]
            elif len(carry) >= 4 * PIECE_CHARS:  # no line break for a long way
                yield carry, len(block), False
                carry = ""
            else:
                yield "", len(block), False
    yield carry + decoder.decode(b"", final=True), 0, True


def chunk_text(text: str, size: int) -> list[str]:
    """Cut `text` into pieces of at most ~`size` characters, at line breaks where possible."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size)
        end = cut + 1 if cut > start else start + size
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def _open_jsonl(f: CorpusFile) -> io.BufferedIOBase:
    if f.kind == "jsonl.gz":
        return gzip.open(f.path, "rb")
    if f.kind == "jsonl.zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(f.path, "rb"), closefd=True))
    return open(f.path, "rb")


def _jsonl(f: CorpusFile, text_field: str, stats: ReadStats) -> Iterator[tuple[str, int]]:
    try:
        with _open_jsonl(f) as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    stats.bad_lines += 1
                    continue
                text = obj.get(text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    stats.missing_field += 1
                elif text:
                    yield text, len(line)
    except (OSError, EOFError) as e:  # a truncated or corrupt archive
        raise DataError(f"data: cannot read {f.path}: {e}; fix or remove the file") from None


def _parquet(f: CorpusFile, text_field: str, stats: ReadStats) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"data: {f.path} is not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"data: {f.path} has no column '{text_field}' (columns: {', '.join(names)}); "
                        "name the text column with --text-field")
    rows = max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        share = f.size * batch.num_rows // rows
        yield from _column_docs(batch.column(0).to_pylist(), share, stats)


def _column_docs(values: list, nbytes: int, stats: ReadStats) -> Iterator[tuple[str, int]]:
    per = nbytes // max(1, len(values))
    for v in values:
        if isinstance(v, str):
            if v:
                yield v, per
        else:
            stats.missing_field += 1


def _dataset(f: CorpusFile, text_field: str, stats: ReadStats) -> Iterator[tuple[str, int]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(f.path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ...
        raise DataError(f"data: {f.path} is not a readable datasets directory ({e})") from None
    splits = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    total = max(1, sum(len(s) for s in splits))
    for split in splits:
        if text_field not in split.column_names:
            raise DataError(f"data: dataset {f.path} has no column '{text_field}' (columns: "
                            f"{', '.join(split.column_names)}); name the text column with --text-field")
        for batch in split.select_columns([text_field]).iter(batch_size=1024):
            values = batch[text_field]
            yield from _column_docs(values, f.size * len(values) // total, stats)


# ----------------------------------------------------------------------------- tokenizing


def is_heldout(doc: int, fraction: float, seed: int) -> bool:
    """Document `doc` belongs to the peer's own held-out split: one document in every round(1/fraction),
    at a seeded offset (decided one document at a time; even a small corpus holds one out)."""
    every = max(2, round(1 / fraction))
    return doc % every == seed % every


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size <= 65536 else "<u4")


@dataclass
class _Progress:
    units: int = 0
    bytes: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "heldout": 0})
    docs: dict[str, int] = field(default_factory=lambda: {"train": 0, "heldout": 0})
    stats: dict[str, int] = field(default_factory=dict)


def cache_key(corpus: Corpus, tokenizer_sha: str, text_field: str, heldout_fraction: float, seed: int) -> str:
    spec = dict(format=FORMAT_VERSION, corpus=corpus.fingerprint(), tokenizer=tokenizer_sha, field=text_field,
                heldout_fraction=heldout_fraction, seed=seed)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def load_tokenizer(path: str | Path):
    """The tokenizers library's Tokenizer from a tokenizer.json; DataError when it is not one."""
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise DataError(f"data: tokenizer file not found: {p}")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception:  # tokenizers raises plain Exceptions for anything it cannot parse
        raise DataError(f"data: {p} is not a tokenizer file (the tokenizers library cannot read it); give a "
                        "tokenizer.json written by the tokenizers library") from None
    if tok.token_to_id(EOS) is None:
        raise DataError(f"data: tokenizer {p} has no {EOS} token; add it as a special token (documents are "
                        "separated by it)")
    return tok


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive flock on `path`: concurrent processes build one cache entry only once."""
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish %s", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tokenize_corpus(corpus_path: str | Path, tokenizer_path: str | Path, cache_dir: str | Path, *,
                    vocab_size: int, text_field: str = "text", heldout_fraction: float = 0.02, seed: int = 0,
                    progress: bool = True) -> Path:
    """Tokenize a private corpus with the run's tokenizer into the cache (or find it there); its directory."""
    corpus = list_corpus(corpus_path)
    tok_sha = sha256_file(Path(tokenizer_path))
    key = cache_key(corpus, tok_sha, text_field, heldout_fraction, seed)
    cache = Path(cache_dir).expanduser().resolve()
    out = cache / f"corpus-{key}"
    if (out / "meta.json").is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".lock-corpus-{key}"):
        if (out / "meta.json").is_file():
            return out
        work = cache / f".partial-corpus-{key}"
        work.mkdir(exist_ok=True)
        try:
            job = _Job(corpus, load_tokenizer(tokenizer_path), work, shard_dtype(vocab_size), text_field,
                       heldout_fraction, seed)
            meta = job.run(progress)
        except DataError:  # bad input: nothing is left half-written (an interruption keeps `work` to resume)
            shutil.rmtree(work, ignore_errors=True)
            raise
        meta.update(tokenizer_sha256=tok_sha, key=key, vocab_size=vocab_size)
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last
        (work / "progress.json").unlink(missing_ok=True)
        os.rename(work, out)
    return out


class _Job:
    """One streaming tokenization into `work`, resumable from work/progress.json."""

    def __init__(self, corpus: Corpus, tok, work: Path, dtype: np.dtype, text_field: str, fraction: float,
                 seed: int):
        self.corpus, self.tok, self.work, self.dtype = corpus, tok, work, dtype
        self.text_field, self.fraction, self.seed = text_field, fraction, seed
        self.eos = tok.token_to_id(EOS)
        self.p = self._resume()

    def _resume(self) -> _Progress:
        try:
            saved = json.loads((self.work / "progress.json").read_text())
            p = _Progress(saved["units"], saved["bytes"], saved["tokens"], saved["docs"], saved["stats"])
        except (OSError, ValueError, KeyError, TypeError):
            p = _Progress()
        for split in ("train", "heldout"):  # cut back anything written after the last progress.json
            with open(self.work / f"{split}.bin", "ab") as f:
                f.truncate(p.tokens[split] * self.dtype.itemsize)
        if p.units:
            logger.info("resuming the tokenization of %s after %d pieces (%.1f MB)", self.corpus.root, p.units,
                        p.bytes / 1e6)
        return p

    def run(self, show: bool) -> dict[str, Any]:
        stats = ReadStats()
        t0, start_bytes, total = time.monotonic(), self.p.bytes, max(1, self.corpus.size)
        label = f"tokenizing {self.corpus.root.name}"
        with progress_bar(label, total, enabled=show, label=f"{label} (bytes)", log_every=10.0 if show else None) \
                as bar, open(self.work / "train.bin", "ab") as train, open(self.work / "heldout.bin", "ab") as held:
            bar.update(self.p.bytes)
            for batch in _prefetch(self._batches(stats)):
                self._encode(batch, {"train": train, "heldout": held})
                self.p.bytes += sum(u.nbytes for u in batch)
                self.p.stats = dict(bad_lines=stats.bad_lines, missing_field=stats.missing_field)
                self._save(train, held)
                rate = (self.p.bytes - start_bytes) / max(1e-9, time.monotonic() - t0)
                bar.update(sum(u.nbytes for u in batch), **{"MB/s": rate / 1e6,
                                                            "ETA s": max(0.0, (total - self.p.bytes) / max(rate, 1))})
        return self._meta(time.monotonic() - t0)

    def _batches(self, stats: ReadStats) -> Iterator[list[Unit]]:
        batch, size = [], 0
        for i, unit in enumerate(iter_units(self.corpus, self.text_field, stats)):
            if i < self.p.units:
                continue  # done before an interruption
            batch.append(unit)
            size += len(unit.text)
            if size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _encode(self, batch: list[Unit], files: dict[str, Any]) -> None:
        encs = self.tok.encode_batch_fast([u.text for u in batch], add_special_tokens=False)
        ids: dict[str, list[int]] = {"train": [], "heldout": []}
        for u, enc in zip(batch, encs):
            split = "heldout" if is_heldout(u.doc, self.fraction, self.seed) else "train"
            ids[split] += enc.ids
            if u.last:
                ids[split].append(self.eos)
                self.p.docs[split] += 1
        for split, got in ids.items():
            np.asarray(got, dtype=self.dtype).tofile(files[split])
            self.p.tokens[split] += len(got)
        self.p.units += len(batch)

    def _save(self, *files) -> None:
        for f in files:
            f.flush()
        tmp = self.work / "progress.json.tmp"
        tmp.write_text(json.dumps(dict(units=self.p.units, bytes=self.p.bytes, tokens=self.p.tokens,
                                       docs=self.p.docs, stats=self.p.stats)))
        os.replace(tmp, self.work / "progress.json")

    def _meta(self, seconds: float) -> dict[str, Any]:
        if not self.p.docs["train"] + self.p.docs["heldout"]:
            skipped = f"{self.corpus.skipped} files of unknown format, {self.p.stats.get('bad_lines', 0)} bad " \
                      f"JSONL lines, {self.p.stats.get('missing_field', 0)} records without '{self.text_field}'"
            raise DataError(f"data: no text in {self.corpus.root} ({skipped}); supported: {SUPPORTED} "
                            "(--text-field names the field)")
        missing = self.p.stats.get("missing_field", 0) + self.p.stats.get("bad_lines", 0)
        if missing or self.corpus.skipped:
            logger.warning("corpus %s: skipped %d records without a string '%s' (or not JSON) and %d files of "
                           "unknown format", self.corpus.root, missing, self.text_field, self.corpus.skipped)
        logger.info("tokenized %s: %d documents, %d + %d held-out tokens, %.1f MB in %.1fs", self.corpus.root,
                    sum(self.p.docs.values()), self.p.tokens["train"], self.p.tokens["heldout"], self.p.bytes / 1e6,
                    seconds)
        return dict(format=FORMAT_VERSION, corpus=str(self.corpus.root), files=len(self.corpus.files),
                    dtype=self.dtype.str, eos_id=self.eos, text_field=self.text_field, tokens=self.p.tokens,
                    docs=self.p.docs, skipped=dict(self.p.stats, unknown_files=self.corpus.skipped),
                    heldout_fraction=self.fraction, seed=self.seed, bytes=self.p.bytes)


def _prefetch(batches: Iterator[list[Unit]], depth: int = 2) -> Iterator[list[Unit]]:
    """Read the next batches in a thread while the current one is encoded (bounded queue)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)

    t = threading.Thread(target=produce, name="corpus-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        t.join(timeout=5)


def remove_partial(cache_dir: str | Path) -> None:
    """Delete interrupted tokenizations (tests, `data clean`)."""
    for p in Path(cache_dir).glob(".partial-corpus-*"):
        shutil.rmtree(p, ignore_errors=True)


def sample_texts(corpus_path: str | Path, text_field: str, max_bytes: int) -> Iterator[str]:
    """Documents of a corpus, in order, up to `max_bytes` of text (0 = all): tokenizer training, eval sets."""
    stats, used = ReadStats(), 0
    for unit in iter_units(list_corpus(corpus_path), text_field, stats):
        if max_bytes and used >= max_bytes:
            return
        used += len(unit.text)
        yield unit.text

