"""Corpus reading, tokenizer training, token shards and per-peer token streams.

`prepare(cfg, seed)` turns a corpus into a directory that every peer can rebuild byte for byte:

    corpus -> documents -> held-out split + `num_silos` silos -> byte-level BPE tokenizer
           -> tokenizer.json, silo_{i}.bin, heldout.bin, manifest.jsonl, meta.json

Corpus kinds (`DataConfig.corpus`) and their *groups*, the unit of the non-IID split:

- ``"stdlib"``: the ``.py`` files of the running Python's standard library (``stdlib_root()``),
  without tests, ``idlelib``, ``lib2to3``, ``site-packages``, bundled wheels and the build-specific
  ``_sysconfigdata*``/``config-*`` files (they differ between machines). One file is one document;
  the group is the top-level module (``email/mime/text.py`` -> ``email``, ``json.py`` -> ``json``).
- a directory: every regular file below it, recursively, in sorted order; hidden entries (names
  starting with ``.``) are skipped. ``*.jsonl`` files hold one document per line, other files are one
  document each. The group is the top-level entry (subdirectory or file name).
- a ``.jsonl`` file: one JSON object per line with a string ``"text"`` field; bad lines are skipped
  and counted. The whole file is one group, so the non-IID split gives each silo a contiguous range
  of lines.
- any other file: plain text with no document structure; it is cut at line breaks into ~8 KiB
  documents and is one group (the non-IID split gives each silo a contiguous section).

Documents longer than 64 KiB are cut at line breaks into pieces named ``path#k``, so that no single
document dominates the held-out split. Files that contain NUL bytes or are not UTF-8 are skipped
and counted; unreadable files are skipped with a warning.

``max_corpus_mb`` caps the bytes read with a fair share per group (water-filling: a group smaller
than its share is kept whole, the others split the rest evenly and keep their files in sorted order,
the last one cut at a line break), so every group keeps some data (1 MB = 10^6 bytes).

Splits: a fixed fraction of documents, chosen with ``seed``, is held out first (the same for "iid"
and "noniid"). Non-IID assigns whole groups to silos, largest first to the lightest silo (ties by
name); with fewer groups than silos the largest groups are halved (by documents, contiguously, named
``group[lo:hi]``) until every silo can get one. IID shuffles the documents with ``seed`` and deals
them round-robin. The tokenizer is trained on all non-held-out documents in corpus order, so it is
the same for both split kinds. In the shards each document's tokens are followed by ``<|endoftext|>``
(id 0). ``meta.json["vocab_size"]`` is the configured size (the model's embedding size); the trained
vocabulary can be smaller when the corpus cannot support more merges.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from p2p_photon.config import Config, DataConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

from .corpus import DataError, chunk_text, file_lock
from .files import sha256_file
from .ui import progress_bar

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EOS = "<|endoftext|>"
MIN_TOKENS = 2048
"""Fewest tokens a silo or the held-out split may have after preparation."""
SINGLE_FILE_DOC_CHARS = 8 * 1024
MAX_DOC_CHARS = 64 * 1024
ENCODE_BATCH = 512
_SNIFF_BYTES = 8192
_HELDOUT_STREAM, _IID_STREAM = 0x68656C64, 0x69696421  # seed streams: held-out choice, IID deal
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)
_STDLIB_SKIP_PATHS = frozenset({"ensurepip/_bundled", "lib-dynload"})


def stdlib_root() -> Path:
    """The running Python's standard-library source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


# ----------------------------------------------------------------------------- corpus listing


@dataclass(frozen=True)
class _Entry:
    group: str
    rel: str  # posix path relative to the corpus root
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Source:
    kind: str  # "stdlib" | "dir" | "jsonl" | "text"
    root: Path
    entries: tuple[_Entry, ...]
    unreadable: tuple[str, ...]  # could not even be listed or stat'ed
    empty: int  # zero-byte files


@dataclass(frozen=True)
class _Doc:
    name: str
    group: str
    text: str


def _resolve_source(corpus: str) -> _Source:
    if corpus == "stdlib":
        return _walk(stdlib_root(), "stdlib")
    path = Path(corpus).expanduser().resolve()
    if not path.exists():
        raise DataError(
            f"data: corpus path not found: {path} (set data.corpus to an existing file or "
            "directory, or to 'stdlib')"
        )
    if path.is_dir():
        return _walk(path, "dir")
    kind = "jsonl" if path.suffix.lower() == ".jsonl" else "text"
    entry, bad, empty = _stat_entry(path, path.name, path.name)
    return _Source(kind, path, entry, bad, empty)


def _walk(root: Path, kind: str) -> _Source:
    entries: list[_Entry] = []
    unreadable: list[str] = []
    empty = 0

    def on_error(err: OSError) -> None:  # an unreadable directory
        logger.warning("skipping unreadable directory %s (%s)", err.filename, err.strerror or err)
        unreadable.append(str(err.filename))

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if _keep_dir(rel_dir / d, kind))
        for name in sorted(filenames):
            rel = rel_dir / name
            if _keep_file(rel, kind):
                got, bad, n_empty = _stat_entry(root / rel, rel.as_posix(), _group_of(rel, kind))
                entries += got
                unreadable += bad
                empty += n_empty
    entries.sort(key=lambda e: e.rel)
    return _Source(kind, root, tuple(entries), tuple(unreadable), empty)


def _keep_dir(rel: Path, kind: str) -> bool:
    if rel.name.startswith("."):
        return False
    if kind != "stdlib":
        return True
    top_config = len(rel.parts) == 1 and rel.name.startswith("config-")
    return not (rel.name in _STDLIB_SKIP_DIRS or rel.as_posix() in _STDLIB_SKIP_PATHS or top_config)


def _keep_file(rel: Path, kind: str) -> bool:
    if rel.name.startswith("."):
        return False
    return kind != "stdlib" or (rel.suffix == ".py" and not rel.name.startswith("_sysconfigdata"))


def _group_of(rel: Path, kind: str) -> str:
    top = rel.parts[0]
    return top.removesuffix(".py") if kind == "stdlib" else top


def _stat_entry(path: Path, rel: str, group: str) -> tuple[tuple[_Entry, ...], tuple[str, ...], int]:
    """(entry,) for a non-empty file, or records it as unreadable / empty."""
    try:
        st = path.stat()
    except OSError as err:
        logger.warning("skipping unreadable file %s (%s)", path, err.strerror or err)
        return (), (str(path),), 0
    if st.st_size == 0:
        return (), (), 1
    return (_Entry(group, rel, path, st.st_size, st.st_mtime_ns),), (), 0


def _describe(source: _Source) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": source.kind, "path": str(source.root)}
    if source.kind == "stdlib":
        out["python"] = platform.python_version()
    return out


# ----------------------------------------------------------------------------- reading


def _budgets(sizes: dict[str, int], cap: int) -> dict[str, int]:
    """Fair share of `cap` bytes per group: small groups keep everything, the rest split evenly."""
    if cap <= 0:
        return dict(sizes)
    out, left = {}, cap
    order = sorted(sizes, key=lambda g: (sizes[g], g))
    for n_left, group in zip(range(len(order), 0, -1), order, strict=True):
        out[group] = min(sizes[group], left // n_left)
        left -= out[group]
    return out


def _read_corpus(source: _Source, cap: int, stats: Counter, show: bool) -> list[_Doc]:
    """All documents in corpus order (groups sorted, files sorted), within the byte cap."""
    by_group: dict[str, list[_Entry]] = {}
    for e in source.entries:
        by_group.setdefault(e.group, []).append(e)
    budgets = _budgets({g: sum(e.size for e in es) for g, es in by_group.items()}, cap)
    docs: list[_Doc] = []
    with _stage("reading corpus", len(source.entries), show) as bar:
        for group in sorted(by_group):
            left = budgets[group]
            for entry in by_group[group]:
                bar.update()
                if left > 0:
                    new, used = _read_entry(entry, left, source.kind, stats)
                    docs += new
                    left -= used
    return docs


def _read_entry(entry: _Entry, budget: int, kind: str, stats: Counter) -> tuple[list[_Doc], int]:
    if entry.rel.lower().endswith(".jsonl") and kind != "stdlib":
        return _read_jsonl(entry, budget, stats)
    text, used = _load_text(entry.path, budget, stats)
    if not text:
        return [], used
    pieces = chunk_text(text, SINGLE_FILE_DOC_CHARS if kind == "text" else MAX_DOC_CHARS)
    if len(pieces) == 1:
        return [_Doc(entry.rel, entry.group, text)], used
    return [_Doc(f"{entry.rel}#{k}", entry.group, p) for k, p in enumerate(pieces)], used


def _load_text(path: Path, limit: int, stats: Counter) -> tuple[str | None, int]:
    """Up to `limit` bytes of UTF-8 text (cut at a line break when truncated) and the bytes read."""
    try:
        with open(path, "rb") as f:
            data = f.read(min(limit + 1, _SNIFF_BYTES))
            if b"\0" not in data:  # a binary file is rejected before it is read whole
                data += f.read(limit + 1 - len(data))
    except OSError as err:
        stats["unreadable"] += 1
        logger.warning("skipping unreadable file %s (%s)", path, err.strerror or err)
        return None, 0
    truncated = len(data) > limit
    data = data[:limit]
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        return _decode(data, truncated), len(data)
    except UnicodeDecodeError:
        stats["binary"] += 1
        logger.debug("skipping binary or non-UTF-8 file %s", path)
        return None, 0


def _decode(data: bytes, truncated: bool) -> str:
    if not truncated:
        return data.decode("utf-8")
    text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)  # drops a split last char
    cut = text.rfind("\n")
    return text[: cut + 1] if cut >= 0 else text


def _read_jsonl(entry: _Entry, budget: int, stats: Counter) -> tuple[list[_Doc], int]:
    docs, used = [], 0
    try:
        with open(entry.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if used >= budget:
                    break
                text = _jsonl_text(line)
                if text is None:
                    stats["bad_jsonl_lines"] += 1
                elif text:
                    docs.append(_Doc(f"{entry.rel}:{lineno}", entry.group, text))
                    used += len(line)
    except OSError as err:
        stats["unreadable"] += 1
        logger.warning("skipping unreadable file %s (%s)", entry.path, err.strerror or err)
    return docs, used


def _jsonl_text(line: bytes) -> str | None:
    """The line's "text" ('' for a blank line), or None when the line is not a usable JSON object."""
    if not line.strip():
        return ""
    try:
        obj = json.loads(line)
    except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
        return None
    text = obj.get("text") if isinstance(obj, dict) else None
    return text if isinstance(text, str) else None


def _check_corpus(docs: list[_Doc], source: _Source, stats: Counter) -> None:
    """Warn about skipped files; raise DataError when nothing usable was read."""
    unreadable = stats["unreadable"] + len(source.unreadable)
    skipped = f"{stats['binary']} binary/non-UTF-8, {unreadable} unreadable, {source.empty} empty files"
    if stats["bad_jsonl_lines"]:
        skipped += f", {stats['bad_jsonl_lines']} bad JSONL lines"
    if docs:
        if stats["binary"] or unreadable or stats["bad_jsonl_lines"]:
            logger.warning("corpus %s: skipped %s", source.root, skipped)
        return
    where = source.root
    if source.kind == "jsonl":
        raise DataError(
            f"data: no line of {where} has a non-empty string 'text' field ({skipped}); "
            'write one JSON object per line, e.g. {"text": "..."}'
        )
    if unreadable and not stats["binary"]:
        raise DataError(
            f"data: none of the files under {where} could be read ({skipped}); "
            "fix their permissions or point data.corpus elsewhere"
        )
    raise DataError(
        f"data: no readable text in {where} ({skipped}); point data.corpus at UTF-8 text "
        "files, a .jsonl file or 'stdlib'"
    )


# ----------------------------------------------------------------------------- splitting


@dataclass(frozen=True)
class _Split:
    train: list[_Doc]  # corpus order, the tokenizer's training data
    heldout: list[_Doc]
    silos: list[list[_Doc]]
    groups: list[list[str]]


def _split(docs: list[_Doc], cfg: DataConfig, seed: int) -> _Split:
    held = _choose_heldout(len(docs), cfg.heldout_fraction, seed, cfg)
    train = [d for i, d in enumerate(docs) if i not in held]
    heldout = [d for i, d in enumerate(docs) if i in held]
    if cfg.split == "iid":
        silos, groups = _deal_iid(train, cfg.num_silos, seed)
    else:
        silos, groups = _assign_noniid(train, cfg.num_silos)
    for i, silo in enumerate(silos):
        if not silo:
            n_groups = len({d.group for d in train})
            raise DataError(
                f"data: silo {i} gets no documents: {cfg.corpus} has only {len(train)} training "
                f"documents in {n_groups} groups; use fewer data.num_silos or a bigger corpus"
            )
    return _Split(train, heldout, silos, groups)


def _choose_heldout(n_docs: int, fraction: float, seed: int, cfg: DataConfig) -> set[int]:
    n_held = max(1, round(fraction * n_docs))
    if n_docs - n_held < cfg.num_silos:
        raise DataError(
            f"data: {cfg.corpus} has only {n_docs} documents, too few for a held-out split and "
            f"{cfg.num_silos} silos; use fewer data.num_silos or a bigger corpus"
        )
    rng = np.random.default_rng([seed, _HELDOUT_STREAM])
    return set(rng.choice(n_docs, size=n_held, replace=False).tolist())


def _deal_iid(docs: list[_Doc], num_silos: int, seed: int) -> tuple[list[list[_Doc]], list[list[str]]]:
    order = np.random.default_rng([seed, _IID_STREAM]).permutation(len(docs))
    silos = [[docs[j] for j in order[i::num_silos]] for i in range(num_silos)]
    return silos, [sorted({d.group for d in s}) for s in silos]


@dataclass(frozen=True)
class _Piece:
    group: str
    lo: int
    hi: int
    docs: tuple[_Doc, ...]
    whole: bool

    @property
    def name(self) -> str:
        return self.group if self.whole else f"{self.group}[{self.lo}:{self.hi}]"

    @property
    def chars(self) -> int:
        return sum(len(d.text) for d in self.docs)


def _assign_noniid(docs: list[_Doc], num_silos: int) -> tuple[list[list[_Doc]], list[list[str]]]:
    """Whole groups to silos, largest first to the lightest silo (ties by name)."""
    by_group: dict[str, list[_Doc]] = {}
    for d in docs:
        by_group.setdefault(d.group, []).append(d)
    pieces = [_Piece(g, 0, len(ds), tuple(ds), True) for g, ds in by_group.items()]
    pieces = _split_pieces(pieces, num_silos)
    loads, assigned = [0] * num_silos, [[] for _ in range(num_silos)]
    for piece in sorted(pieces, key=lambda p: (-p.chars, p.name)):
        i = min(range(num_silos), key=lambda s: (loads[s], s))
        assigned[i].append(piece)
        loads[i] += piece.chars
    silos = [[d for p in sorted(ps, key=lambda p: p.name) for d in p.docs] for ps in assigned]
    return silos, [sorted(p.name for p in ps) for ps in assigned]


def _split_pieces(pieces: list[_Piece], num_silos: int) -> list[_Piece]:
    """Halve the largest multi-document piece until there are at least `num_silos` pieces."""
    pieces = list(pieces)
    while len(pieces) < num_silos:
        splittable = [p for p in pieces if len(p.docs) > 1]
        if not splittable:
            break
        big = max(splittable, key=lambda p: (p.chars, p.name))
        pieces.remove(big)
        pieces += _halve(big)
    return pieces


def _halve(p: _Piece) -> list[_Piece]:
    sizes = np.cumsum([len(d.text) for d in p.docs])
    k = int(np.clip(np.searchsorted(sizes, sizes[-1] / 2), 1, len(p.docs) - 1))
    mid = p.lo + k
    return [_Piece(p.group, p.lo, mid, p.docs[:k], False), _Piece(p.group, mid, p.hi, p.docs[k:], False)]


# ----------------------------------------------------------------------------- tokenizer and shards


def _train_tokenizer(docs: list[_Doc], vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer, length=len(docs))
    return tok


def _save_tokenizer(tok: Tokenizer, out: Path) -> None:
    """tokenizer_config.json via transformers, then tokenizer.json as the tokenizers library writes it
    (so its hash does not depend on the transformers version)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    tok.save(str(out / "tokenizer.json"))


def _shard_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def _write_shard(
    tok: Tokenizer, docs: list[_Doc], path: Path, dtype: str, advance: Callable[[int], None]
) -> list[int]:
    """Tokenize `docs` (each followed by EOS) into a raw little-endian shard; returns tokens per doc."""
    eos_id = tok.token_to_id(EOS)
    counts: list[int] = []
    with open(path, "wb") as f:
        for start in range(0, len(docs), ENCODE_BATCH):
            batch = docs[start : start + ENCODE_BATCH]
            ids: list[int] = []
            for enc in tok.encode_batch_fast([d.text for d in batch], add_special_tokens=False):
                ids += enc.ids
                ids.append(eos_id)
                counts.append(len(enc.ids) + 1)
            np.asarray(ids, dtype=_np_dtype(dtype)).tofile(f)
            advance(len(batch))
    return counts


def _np_dtype(dtype: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def _write_shards(tok: Tokenizer, split: _Split, out: Path, dtype: str, show: bool) -> dict[str, Any]:
    """All shards plus manifest.jsonl (one line per document: name, group, split, tokens)."""
    parts = [(f"silo_{i}", docs) for i, docs in enumerate(split.silos)] + [("heldout", split.heldout)]
    tokens: dict[str, int] = {}
    total = len(split.heldout) + sum(map(len, split.silos))
    manifest_path = out / "manifest.jsonl"
    with _stage("tokenizing", total, show) as bar, open(manifest_path, "w", encoding="utf-8") as manifest:
        for name, docs in parts:
            counts = _write_shard(tok, docs, out / f"{name}.bin", dtype, bar.update)
            tokens[name] = sum(counts)
            for d, n in zip(docs, counts, strict=True):
                manifest.write(
                    json.dumps({"name": d.name, "group": d.group, "split": name, "tokens": n}) + "\n"
                )
    return tokens


def _check_tokens(tokens: dict[str, int], cfg: DataConfig) -> None:
    for name, n in tokens.items():
        if n >= MIN_TOKENS:
            continue
        if name == "heldout":
            raise DataError(
                f"data: the held-out split of {cfg.corpus} has only {n} tokens (< {MIN_TOKENS}); "
                "raise data.heldout_fraction or use a bigger corpus (data.max_corpus_mb)"
            )
        raise DataError(
            f"data: {name} of {cfg.corpus} has only {n} tokens (< {MIN_TOKENS}); use fewer "
            f"data.num_silos (now {cfg.num_silos}) or a bigger corpus "
            f"(data.max_corpus_mb={cfg.max_corpus_mb:g})"
        )


# ----------------------------------------------------------------------------- prepare


def _cache_key(cfg: DataConfig, seed: int, source: _Source) -> str:
    """Short hash of everything that determines the prepared data (the listing stands in for content)."""
    import tokenizers

    spec = {
        "format": FORMAT_VERSION,
        "corpus": _describe(source),
        "listing": hashlib.sha256(
            json.dumps([(e.rel, e.size, e.mtime_ns) for e in source.entries]).encode()
        ).hexdigest(),
        "vocab_size": cfg.vocab_size,
        "num_silos": cfg.num_silos,
        "split": cfg.split,
        "heldout_fraction": cfg.heldout_fraction,
        "max_corpus_mb": cfg.max_corpus_mb,
        "seed": seed,
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


def _stage(description: str, total: int | None, show: bool) -> contextlib.AbstractContextManager:
    """One stage of `prepare` as a progress bar (on a TTY when `show`), or a log line every 10 s when
    `show` and stderr is not a TTY; silent when not `show` (tests, peers preparing in the background)."""
    return progress_bar(description, total, enabled=show, label=description, log_every=10.0 if show else None)


def prepare(cfg: DataConfig, seed: int, *, progress: bool = True) -> Path:
    """Prepare (or find in the cache) the tokenizer and token shards for `cfg`; returns their directory."""
    source = _resolve_source(cfg.corpus)
    key = _cache_key(cfg, seed, source)
    cache = Path(cfg.cache_dir).expanduser().resolve()
    out = cache / f"data-{key}"
    if _is_complete(out):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".lock-{key}"):
        if _is_complete(out):  # another process finished it while we waited
            return out
        logger.info("preparing data %s from %s (%s)", out, source.root, source.kind)
        _build_atomically(out, lambda tmp: _build(cfg, seed, source, tmp, progress))
    return out


def _build_atomically(out: Path, build: Callable[[Path], None]) -> None:
    """Build into a temporary sibling directory, then rename it into place."""
    for stale in out.parent.glob(f".tmp-{out.name}-*"):  # left by a killed process; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    if out.exists():
        logger.warning("removing incomplete prepared data %s", out)
        shutil.rmtree(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        build(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(cfg: DataConfig, seed: int, source: _Source, out: Path, show: bool) -> None:
    t0, stats = time.perf_counter(), Counter()
    cap = int(cfg.max_corpus_mb * 1_000_000)
    docs = _read_corpus(source, cap, stats, show)
    _check_corpus(docs, source, stats)
    split = _split(docs, cfg, seed)
    with _stage(f"training tokenizer (vocab {cfg.vocab_size})", None, show) as bar:
        tok = _train_tokenizer(split.train, cfg.vocab_size)
        bar.complete()
    _save_tokenizer(tok, out)
    dtype = _shard_dtype(cfg.vocab_size)
    tokens = _write_shards(tok, split, out, dtype, show)
    _check_tokens(tokens, cfg)
    meta = _meta(cfg, seed, source, docs, split, tokens, stats, tok, out)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")  # written last
    logger.info(
        "prepared %d documents (%d chars) into %d silos + held-out, %d tokens, in %.1fs",
        len(docs),
        sum(len(d.text) for d in docs),
        cfg.num_silos,
        sum(tokens.values()),
        time.perf_counter() - t0,
    )


def _meta(
    cfg: DataConfig,
    seed: int,
    source: _Source,
    docs: list[_Doc],
    split: _Split,
    tokens: dict[str, int],
    stats: Counter,
    tok: Tokenizer,
    out: Path,
) -> dict[str, Any]:
    corpus = _describe(source) | {
        "files": len(source.entries),
        "groups": len({d.group for d in docs}),
        "chars": sum(len(d.text) for d in docs),
        "max_corpus_mb": cfg.max_corpus_mb,
    }
    return {
        "format": FORMAT_VERSION,
        "vocab_size": cfg.vocab_size,
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "dtype": _shard_dtype(cfg.vocab_size),
        "eos_token": EOS,
        "eos_id": tok.token_to_id(EOS),
        "num_silos": cfg.num_silos,
        "split": cfg.split,
        "seed": seed,
        "heldout_fraction": cfg.heldout_fraction,
        "silo_groups": {str(i): g for i, g in enumerate(split.groups)},
        "silo_tokens": [tokens[f"silo_{i}"] for i in range(cfg.num_silos)],
        "heldout_tokens": tokens["heldout"],
        "docs": {"total": len(docs), "heldout": len(split.heldout), "silos": [len(s) for s in split.silos]},
        "skipped_files": {
            "binary": stats["binary"],
            "unreadable": stats["unreadable"] + len(source.unreadable),
            "empty": source.empty,
            "bad_jsonl_lines": stats["bad_jsonl_lines"],
        },
        "corpus": corpus,
        "tokenizer_sha256": sha256_file(out / "tokenizer.json"),
    }


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Prepared:
    """A prepared data directory (see `prepare`)."""

    dir: Path
    meta: dict
    vocab_size: int
    """The configured vocabulary size: the model's embedding size (>= the trained vocabulary)."""
    tokenizer_hash: str
    """sha256 of tokenizer.json: peers of one run must agree on it."""

    @property
    def heldout_path(self) -> Path:
        return self.dir / "heldout.bin"

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def num_silos(self) -> int:
        return int(self.meta["num_silos"])

    def silo_path(self, i: int) -> Path:
        if not 0 <= i < self.num_silos:
            raise DataError(
                f"data: silo {i} does not exist in {self.dir} (it has {self.num_silos} silos); "
                f"set data.silo to 0..{self.num_silos - 1}"
            )
        return self.dir / f"silo_{i}.bin"

    def tokens(self, i: int) -> int:
        self.silo_path(i)
        return int(self.meta["silo_tokens"][i])

    def tokenizer(self) -> PreTrainedTokenizerFast:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_file=str(self.dir / "tokenizer.json"),
            eos_token=EOS,
            bos_token=EOS,
            unk_token=EOS,
            pad_token=EOS,
            clean_up_tokenization_spaces=False,
        )


def load_prepared(path: str | Path) -> Prepared:
    """Open a directory written by `prepare`, checking the tokenizer hash and the shard sizes."""
    root = Path(path)
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(
            f"data: {root} is not a prepared data directory (no readable meta.json); "
            "run `p2p-photon data prepare` first"
        ) from None
    digest = sha256_file(root / "tokenizer.json") if (root / "tokenizer.json").is_file() else "missing"
    if digest != meta.get("tokenizer_sha256"):
        raise DataError(
            f"data: {root}/tokenizer.json is missing or modified (hash mismatch); delete {root} "
            "and run `p2p-photon data prepare` again"
        )
    prep = Prepared(dir=root, meta=meta, vocab_size=int(meta["vocab_size"]), tokenizer_hash=digest)
    itemsize = _np_dtype(prep.dtype).itemsize
    expected = [(prep.silo_path(i), prep.tokens(i)) for i in range(prep.num_silos)]
    for shard, n in [*expected, (prep.heldout_path, int(meta["heldout_tokens"]))]:
        if not shard.is_file() or shard.stat().st_size != n * itemsize:
            raise DataError(
                f"data: shard {shard} is missing or truncated; delete {root} and run "
                "`p2p-photon data prepare` again"
            )
    return prep


# ----------------------------------------------------------------------------- streams


def _open_shard(path: Path, dtype: str, window: int) -> np.ndarray:
    dt = _np_dtype(dtype)
    try:
        n = Path(path).stat().st_size // dt.itemsize
    except OSError:
        raise DataError(f"data: token shard not found: {path}; run `p2p-photon data prepare` again") from None
    if n < window:
        raise DataError(
            f"data: shard {path} has {n} tokens, fewer than one window of seq_len+1={window}; "
            "use a smaller model.seq_len (or fewer data.num_silos / a bigger corpus)"
        )
    return np.memmap(path, dtype=dt, mode="r", shape=(n,))


def _read_window(shards: list[np.ndarray], offsets: np.ndarray, start: int, length: int) -> np.ndarray:
    """Tokens [start, start+length) of the concatenated shards."""
    out = np.empty(length, dtype=np.int64)
    s = int(np.searchsorted(offsets, start, side="right")) - 1
    filled = 0
    while filled < length:
        lo = start + filled - int(offsets[s])
        take = min(length - filled, len(shards[s]) - lo)
        out[filled : filled + take] = shards[s][lo : lo + take]
        filled += take
        s += 1
    return out


class TokenStream:
    """Endless, deterministic stream of (batch_size, seq_len + 1) LongTensor windows from one or more shards.

    Windows are non-overlapping slices of seq_len + 1 tokens of the concatenated shards; each epoch
    visits all of them in a permutation drawn from numpy's default_rng((seed, stream_id, epoch)).
    `state_dict()` is the cursor (epoch, position within the epoch): a stream restored from it yields
    exactly the batches the original would have produced next.
    """

    def __init__(
        self, paths: list[Path], *, seq_len: int, batch_size: int, seed: int, stream_id: int, dtype: str
    ) -> None:
        if not paths or seq_len < 1 or batch_size < 1:
            raise ValueError("TokenStream needs at least one shard, seq_len >= 1 and batch_size >= 1")
        self.paths = [Path(p) for p in paths]
        self.seq_len, self.batch_size, self.seed, self.stream_id = seq_len, batch_size, seed, stream_id
        self.window = seq_len + 1
        self._shards = [_open_shard(p, dtype, self.window) for p in self.paths]
        self._offsets = np.cumsum([0] + [len(s) for s in self._shards])
        self.n_windows = int(self._offsets[-1]) // self.window
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.stream_id, self.epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n_windows), self.epoch
        return self._perm

    def _next_window(self) -> np.ndarray:
        if self.position >= self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        k = int(self._permutation()[self.position])
        self.position += 1
        return _read_window(self._shards, self._offsets, k * self.window, self.window)

    def next_batch(self) -> torch.Tensor:
        """int64 tensor of shape (B, T + 1): inputs = x[:, :-1], targets = x[:, 1:]."""
        return torch.from_numpy(np.stack([self._next_window() for _ in range(self.batch_size)]))

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "stream_id": self.stream_id,
            "n_windows": self.n_windows,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "stream_id", "n_windows", "seq_len"):
            if int(state.get(key, -1)) != getattr(self, key):
                raise DataError(
                    f"data: cannot resume the token stream: the saved {key} is {state.get(key)}, "
                    f"this stream's is {getattr(self, key)}; resume with the same data and config "
                    "as the checkpoint"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_windows:
            raise DataError(f"data: invalid token stream state (epoch {epoch}, position {position})")
        self.epoch, self.position = epoch, position


def open_silo_stream(
    prep: Prepared, silos: list[int], *, seq_len: int, batch_size: int, seed: int, stream_id: int
) -> TokenStream:
    """A TokenStream over the given silos of a prepared dataset."""
    if not silos:
        raise DataError("data: open_silo_stream needs at least one silo index (data.silo)")
    return TokenStream(
        [prep.silo_path(i) for i in silos],
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        stream_id=stream_id,
        dtype=prep.dtype,
    )


def heldout_batches(prep: Prepared, *, seq_len: int, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """The first n_batches * batch_size held-out windows in order (wrapping around): fixed, no randomness."""
    window = seq_len + 1
    shards = [_open_shard(prep.heldout_path, prep.dtype, window)]
    offsets = np.array([0, len(shards[0])])
    n = len(shards[0]) // window
    return [
        torch.from_numpy(
            np.stack(
                [
                    _read_window(shards, offsets, ((b * batch_size + j) % n) * window, window)
                    for j in range(batch_size)
                ]
            )
        )
        for b in range(n_batches)
    ]


# ----------------------------------------------------------------------------- a peer's data


@dataclass(frozen=True)
class PeerData:
    """What a peer trains and evaluates on, whichever way its data came."""

    tokenizer_hash: str
    vocab_size: int
    stream: TokenStream
    eval_batches: list[torch.Tensor]
    """The swarm's comparable held-out number: the run's public eval set (a spec run) or the shared
    corpus' held-out split."""
    local_heldout: list[torch.Tensor] | None = None
    """This peer's own held-out split of its private corpus (a spec run), when it holds a full window."""


def peer_data(cfg: Config, *, progress: bool = True) -> PeerData:
    """The data of a peer: its silo of the shared corpus, or (data.run_spec) its private corpus
    tokenized with the run's tokenizer, its own held-out split and the run's public eval set."""
    seq, bs = cfg.model.seq_len, cfg.inner.batch_size
    if not cfg.data.run_spec:
        prep = load_prepared(prepare(cfg.data, cfg.seed, progress=progress))
        stream = open_silo_stream(prep, [cfg.data.silo], seq_len=seq, batch_size=bs, seed=cfg.seed,
                                  stream_id=cfg.data.silo)
        return PeerData(prep.tokenizer_hash, prep.vocab_size, stream,
                        heldout_batches(prep, seq_len=seq, batch_size=bs, n_batches=cfg.logging.eval_batches))
    from . import corpus, runspec

    spec = runspec.load_run(cfg.data.run_spec, cfg.dht.run_id)
    out = corpus.tokenize_corpus(cfg.data.corpus, spec.tokenizer_path, Path(cfg.data.cache_dir) / "private",
                                 vocab_size=spec.vocab_size, text_field=cfg.data.text_field,
                                 heldout_fraction=cfg.data.heldout_fraction, seed=cfg.seed, progress=progress)
    meta = json.loads((out / "meta.json").read_text())
    dtype, need = np.dtype(meta["dtype"]).name, bs * (seq + 1)
    if meta["tokens"]["train"] < need:
        raise DataError(
            f"data: corpus {cfg.data.corpus} is too small: {meta['tokens']['train']} training tokens, one batch "
            f"needs inner.batch_size x (model.seq_len+1) = {need}; add text or lower inner.batch_size")
    stream = TokenStream([out / "train.bin"], seq_len=seq, batch_size=bs, seed=cfg.seed, stream_id=0, dtype=dtype)
    local = None
    if meta["tokens"]["heldout"] >= seq + 1:
        local = fixed_batches(out / "heldout.bin", dtype, seq_len=seq, batch_size=bs, n_batches=cfg.logging.eval_batches)
    else:
        logger.warning("the local held-out split of %s has %d tokens, less than one sequence: no local held-out "
                       "metric (raise data.heldout_fraction or add text)", cfg.data.corpus, meta["tokens"]["heldout"])
    public = fixed_batches(spec.eval_path, "uint32", seq_len=seq, batch_size=bs, n_batches=cfg.logging.eval_batches)
    return PeerData(spec.spec["tokenizer"]["sha256"], spec.vocab_size, stream, public, local)


def fixed_batches(path: Path, dtype: str, *, seq_len: int, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    """The first n_batches * batch_size windows of one shard in order (wrapping around)."""
    window = seq_len + 1
    shards = [_open_shard(path, dtype, window)]
    offsets = np.array([0, len(shards[0])])
    n = len(shards[0]) // window
    return [torch.from_numpy(np.stack([_read_window(shards, offsets, ((b * batch_size + j) % n) * window, window)
                                       for j in range(batch_size)])) for b in range(n_batches)]


def write_silo_dirs(cfg: DataConfig, seed: int, out: str | Path) -> tuple[list[Path], Path]:
    """The shared corpus split as `prepare` splits it, written as plain text files: out/silos/silo_{i}/ (each
    demo peer's stand-in for private data) and out/heldout/ (the run's public eval set)."""
    source, stats = _resolve_source(cfg.corpus), Counter()
    docs = _read_corpus(source, int(cfg.max_corpus_mb * 1_000_000), stats, show=False)
    _check_corpus(docs, source, stats)
    split = _split(docs, cfg, seed)
    root = Path(out)
    parts = [(f"silos/silo_{i}", silo) for i, silo in enumerate(split.silos)] + [("heldout", split.heldout)]
    for name, part in parts:
        for d in part:
            f = root / name / d.name.replace("#", ".part").replace(":", ".line")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(d.text, encoding="utf-8")
    return [root / "silos" / f"silo_{i}" for i in range(len(split.silos))], root / "heldout"
