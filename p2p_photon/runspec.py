"""A run is a spec that travels with the swarm: its run-wide settings, its tokenizer and a small
public evaluation set, named by the hash of its content.

A run directory (`p2p-photon run new ... -o RUN_DIR`) holds three files:

    spec.json       {"format", "settings": {dotted run-wide key: value}, "tokenizer": {file, sha256,
                     vocab_size}, "eval": {file, sha256, tokens, dtype, source}}
    tokenizer.json  the run's tokenizer (the tokenizers library's format, with <|endoftext|>)
    eval.bin        the public eval set: token ids (little-endian), EOS after each document

The run id is the first 16 hex digits of sha256(spec.json as bytes); spec.json names the other
files by their sha256, so the run id names all three. `load_run` checks both. The bootstrap
(`bootstrap --run RUN_DIR`) and every peer of the run serve the files over hivemind's P2P layer
(a protobuf stream handler `p2p_photon.spec.<run id>` registered in the DHT process) and announce
themselves in the DHT: key `p2p_photon_runs` (subkey: run id) lists the runs a DHT hosts, key
`<run id>_spec` (subkey: peer id) the peers that serve one. A joining peer (`fetch_run`) picks the
run, downloads the files from a server into a temporary directory, checks them against the run
id, and keeps the copy in `{data.cache_dir}/runs/<run id>/`.

Local settings (device, batch size, threads, data path, checkpoint dir, ...) stay local; a local
config or --set that gives a run-wide key another value than the spec is a one-line error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, ConfigError, apply_overrides, from_dict, read_toml
from .corpus import EOS, DataError, is_heldout, load_tokenizer, sample_texts
from .dhtcall import dht_call
from .errors import UsageError, UserError
from .files import sha256_file

logger = logging.getLogger(__name__)

FORMAT = 1
SPEC, TOKENIZER, EVAL = "spec.json", "tokenizer.json", "eval.bin"
RUNS_KEY = "p2p_photon_runs"
RUN_WIDE = ("seed", "model.preset", "model.seq_len", "data.vocab_size", "inner.lr", "inner.min_lr_ratio",
            "inner.warmup_steps", "inner.total_steps", "outer.preset", "outer.lr", "outer.momentum",
            "outer.nesterov", "outer.block_cycle", "outer.block_order", "averaging.compression",
            "rounds.target_samples_per_round")
"""What every peer of a run must agree on; the rest of the config is each peer's own."""
EVAL_MAX_TOKENS = 1 << 18
EVAL_FRACTION = 0.02  # without --eval: the share of --train-tokenizer-on's documents kept for the eval set
ANNOUNCE_EVERY, ANNOUNCE_TTL = 15.0, 60.0
CHUNK = 256 * 1024


class RunSpecError(UserError):
    """A run spec that cannot be created, found, fetched or trusted (exit code 1)."""


class RunWideOverride(ConfigError):
    """A local config gives a run-wide key another value than the run's spec (exit code 2)."""


@dataclass(frozen=True)
class RunSpec:
    dir: Path
    run_id: str
    spec: dict

    @property
    def settings(self) -> dict[str, Any]:
        return self.spec["settings"]

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / TOKENIZER

    @property
    def eval_path(self) -> Path:
        return self.dir / EVAL

    @property
    def vocab_size(self) -> int:
        return int(self.settings["data.vocab_size"])


def run_id_of(spec_bytes: bytes) -> str:
    return hashlib.sha256(spec_bytes).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def load_run(path: str | Path, run_id: str | None = None) -> RunSpec:
    """A run directory, verified: spec.json hashes to `run_id` (when given), the files to their hashes."""
    d = Path(path).expanduser().resolve()
    try:
        raw = (d / SPEC).read_bytes()
        spec = json.loads(raw)
        files = {TOKENIZER: spec["tokenizer"]["sha256"], EVAL: spec["eval"]["sha256"]}
        spec["settings"]  # noqa: B018  (checked for presence)
    except OSError:
        raise RunSpecError(f"run: {d} is not a run directory (no readable {SPEC}); create one with "
                           "`p2p-photon run new`") from None
    except (ValueError, KeyError, TypeError):
        raise RunSpecError(f"run: {d / SPEC} is not a run spec (unreadable JSON or missing fields)") from None
    got = run_id_of(raw)
    if run_id is not None and got != run_id:
        raise RunSpecError(f"run: the spec in {d} hashes to {got}, not to its run id {run_id}: it was changed "
                           "or is another run's; refusing it")
    for name, digest in files.items():
        if not (d / name).is_file() or sha256_file(d / name) != digest:
            raise RunSpecError(f"run: {d / name} does not match the spec's sha256 (missing or modified); "
                               "recreate the run with `p2p-photon run new` or fetch it again")
    return RunSpec(d, got, spec)


# ----------------------------------------------------------------------------- creating


def create_run(cfg: Config, out: str | Path, *, tokenizer: str | None = None, train_on: str | None = None,
               eval_path: str | None = None, text_field: str = "text") -> RunSpec:
    """Write a run directory `out` (new or empty) and return it; nothing is left behind on an error."""
    out = Path(os.path.abspath(out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunSpecError(f"run: {out} exists and is not an empty directory; choose a new -o")
    if (tokenizer is None) == (train_on is None):
        raise UsageError("run new: give exactly one of --tokenizer FILE and --train-tokenizer-on CORPUS")
    if tokenizer is not None and eval_path is None:
        raise UsageError("run new: with --tokenizer, give --eval PATH (a small public text set every peer "
                         "reports perplexity on)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_run(cfg, tmp, tokenizer, train_on, eval_path, text_field)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_run(out)


def _write_run(cfg: Config, d: Path, tokenizer: str | None, train_on: str | None, eval_path: str | None,
               text_field: str) -> None:
    cap = int(cfg.data.max_corpus_mb * 1_000_000)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        shutil.copyfile(tokenizer, d / TOKENIZER)
    else:
        tok = _train_tokenizer(train_on, text_field, cfg.data.vocab_size, cfg.seed, cap)
        tok.save(str(d / TOKENIZER))
    if tok.get_vocab_size() > cfg.data.vocab_size:
        raise RunSpecError(f"run: the tokenizer has {tok.get_vocab_size()} tokens, more than data.vocab_size "
                           f"({cfg.data.vocab_size}, the model's embedding size); raise data.vocab_size")
    if eval_path is not None:
        texts, source = sample_texts(eval_path, text_field, cap), str(eval_path)
    else:
        texts, source = _heldout_texts(train_on, text_field, cfg.seed, cap), f"held-out documents of {train_on}"
    n = _write_eval(tok, texts, d / EVAL, cfg.model.seq_len)
    settings = {k: _get(cfg, k) for k in RUN_WIDE}
    spec = dict(format=FORMAT, settings=settings,
                tokenizer=dict(file=TOKENIZER, sha256=sha256_file(d / TOKENIZER), vocab_size=tok.get_vocab_size()),
                eval=dict(file=EVAL, sha256=sha256_file(d / EVAL), tokens=n, dtype="<u4", source=source))
    (d / SPEC).write_text(json.dumps(spec, indent=1, sort_keys=True) + "\n")


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _heldout_texts(corpus: str, field: str, seed: int, cap: int):
    return (t for i, t in enumerate(_documents(corpus, field, cap)) if is_heldout(i, EVAL_FRACTION, seed))


def _documents(corpus: str, field: str, cap: int):
    """Whole documents (pieces joined) of a corpus, up to `cap` bytes."""
    from .corpus import ReadStats, iter_units, list_corpus

    parts, used = [], 0
    for u in iter_units(list_corpus(corpus), field, ReadStats()):
        parts.append(u.text)
        used += len(u.text)
        if u.last:
            yield "".join(parts)
            parts = []
            if cap and used >= cap:
                return


def _train_tokenizer(corpus: str, field: str, vocab_size: int, seed: int, cap: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = (t for i, t in enumerate(_documents(corpus, field, cap)) if not is_heldout(i, EVAL_FRACTION, seed))
    tok.train_from_iterator(docs, trainer)
    return tok


def _write_eval(tok, texts, path: Path, seq_len: int) -> int:
    eos, ids = tok.token_to_id(EOS), []
    for text in texts:
        ids += tok.encode(text, add_special_tokens=False).ids + [eos]
        if len(ids) >= EVAL_MAX_TOKENS:
            break
    ids = ids[:EVAL_MAX_TOKENS]
    if len(ids) < seq_len + 1:
        raise DataError(f"run: the eval set has {len(ids)} tokens, fewer than one sequence of model.seq_len+1 = "
                        f"{seq_len + 1}; give a bigger --eval (or a bigger --train-tokenizer-on corpus)")
    np.asarray(ids, dtype="<u4").tofile(path)
    return len(ids)


# ----------------------------------------------------------------------------- a peer's config


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def peer_config(config: str | None, overrides: list[str], spec: RunSpec, *, data: str, text_field: str,
                cache_dir: str | None = None) -> Config:
    """The local config (file and --set) with the run's settings; a run-wide key set to another value
    is a RunWideOverride naming the run-wide keys."""
    local = apply_overrides(read_toml(config) if config else {}, overrides)
    flat = _flat(local)
    for key in RUN_WIDE:
        if key in flat and flat[key] != spec.settings[key]:
            raise RunWideOverride(
                f"config: {key} is run-wide: run {spec.run_id} sets it to {spec.settings[key]!r}, your config says "
                f"{flat[key]!r}; remove it (run-wide keys: {', '.join(RUN_WIDE)})")
    sets = [f"{k}={json.dumps(v)}" for k, v in spec.settings.items()]
    sets += [f"dht.run_id={json.dumps(spec.run_id)}", f"data.corpus={json.dumps(str(data))}",
             f"data.run_spec={json.dumps(str(spec.dir))}", f"data.text_field={json.dumps(text_field)}"]
    if cache_dir:
        sets.append(f"data.cache_dir={json.dumps(cache_dir)}")
    return from_dict(apply_overrides(local, sets))


# ----------------------------------------------------------------------------- serving


async def _register(paths: dict[str, str], run_id: str, _dht, node) -> None:
    """Runs in the DHT process: serve the files (read now, held in memory) under this run's handler name.
    Paths, not bytes, cross the pipe to the DHT process: hivemind's pipe is not made for large messages."""
    from google.protobuf.wrappers_pb2 import StringValue

    files = {name: Path(path).read_bytes() for name, path in paths.items()}
    await node.p2p.add_protobuf_handler(f"p2p_photon.spec.{run_id}", functools.partial(_serve_file, files),
                                        StringValue, stream_output=True)


async def _serve_file(files: dict[str, bytes], request, _context):
    from google.protobuf.wrappers_pb2 import BytesValue

    blob = files.get(request.value, b"")
    for start in range(0, max(1, len(blob)), CHUNK):
        yield BytesValue(value=blob[start : start + CHUNK])


class SpecServer:
    """Serves a run's spec from a DHT's P2P daemon and keeps announcing it until `stop`."""

    def __init__(self, dht, spec: RunSpec):
        self.dht, self.spec, self._stop = dht, spec, threading.Event()
        paths = {name: str(spec.dir / name) for name in (SPEC, TOKENIZER, EVAL)}
        dht.run_coroutine(functools.partial(_register, paths, spec.run_id))
        self.announce()
        self._thread = threading.Thread(target=self._loop, name="spec-announcer", daemon=True)
        self._thread.start()
        logger.info("serving the spec of run %s", spec.run_id)

    def announce(self) -> None:
        from hivemind.utils import get_dht_time

        until, peer = get_dht_time() + ANNOUNCE_TTL, self.dht.peer_id.to_base58()
        try:
            for key, subkey in ((RUNS_KEY, self.spec.run_id), (f"{self.spec.run_id}_spec", peer)):
                dht_call(self.dht, "store", key, subkey, until, subkey=subkey, timeout=10)
        except Exception as e:  # a DHT that is shutting down; the next announcement retries
            logger.debug("announcing run %s failed: %r", self.spec.run_id, e)

    def _loop(self) -> None:
        while not self._stop.wait(ANNOUNCE_EVERY):
            self.announce()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def serve(dht, spec: RunSpec) -> SpecServer:
    return SpecServer(dht, spec)


# ----------------------------------------------------------------------------- fetching


def _subkeys(dht, key: str) -> list[str]:
    found = dht_call(dht, "get", key, latest=True)
    value = found.value if found is not None else None
    return sorted(value) if isinstance(value, dict) else []


def choose_run(dht, run_id: str | None, timeout: float) -> str:
    """The run to join: `run_id` if this DHT hosts it, or the only run it hosts."""
    deadline, runs = time.monotonic() + timeout, []
    while True:
        runs = _subkeys(dht, RUNS_KEY)
        if (run_id in runs) if run_id else len(runs) == 1:
            return run_id or runs[0]
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    hosted = ", ".join(runs) if runs else "none"
    if run_id:
        raise RunSpecError(f"run: unknown run id {run_id}: no peer of this swarm announces it (runs hosted here: "
                           f"{hosted}); check --run-id")
    if runs:
        raise UsageError(f"run: this swarm hosts several runs ({hosted}); choose one with --run-id")
    raise RunSpecError(f"run: no run is announced in this swarm within {timeout:g}s; start the bootstrap with "
                       "--run RUN_DIR (or check --initial-peers)")


async def _download(peer: str, run_id: str, into: str, _dht, node) -> None:
    """Runs in the DHT process: stream the run's files from `peer` into the directory `into` (files, not
    bytes, cross back to us: hivemind's pipe is not made for large messages)."""
    from google.protobuf.wrappers_pb2 import BytesValue, StringValue
    from hivemind.p2p import PeerID

    for name in (SPEC, TOKENIZER, EVAL):
        stream = await node.p2p.iterate_protobuf_handler(PeerID.from_base58(peer), f"p2p_photon.spec.{run_id}",
                                                         StringValue(value=name), BytesValue)
        with open(Path(into) / name, "wb") as f:
            async for msg in stream:
                f.write(msg.value)


def fetch_run(dht, run_id: str | None, root: str | Path, timeout: float) -> RunSpec:
    """Join a run by its id (or the swarm's only run): the local copy in `root`/<run id> if it verifies,
    otherwise the spec downloaded from a peer that serves it, checked against the run id."""
    run_id = choose_run(dht, run_id, timeout)
    dest = Path(root).expanduser().resolve() / run_id
    if (dest / SPEC).is_file():
        try:
            return load_run(dest, run_id)
        except RunSpecError as e:
            logger.warning("%s; fetching it again", e)
            shutil.rmtree(dest, ignore_errors=True)
    deadline, problems = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        peers = _subkeys(dht, f"{run_id}_spec")
        random.shuffle(peers)
        for peer in peers:
            got = _try_download(dht, peer, run_id, dest, max(1.0, deadline - time.monotonic()), problems)
            if got is not None:
                return got
        time.sleep(1.0)
    mismatched = [p for p in problems if "hashes to" in p]
    if mismatched:
        raise RunSpecError(mismatched[-1])
    raise RunSpecError(f"run: no peer served the spec of run {run_id} within {timeout:g}s"
                       + (f" ({problems[-1]})" if problems else "") + "; try again when a peer of the run is up")


def _try_download(dht, peer: str, run_id: str, dest: Path, timeout: float, problems: list[str]) -> RunSpec | None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{run_id}-", dir=dest.parent))
    try:
        try:
            dht_call(dht, "run_coroutine", functools.partial(_download, peer, run_id, str(tmp)), timeout=timeout)
        except Exception as e:  # the peer left, refused, or was too slow: try another one
            problems.append(f"peer {peer[-8:]}: {type(e).__name__}")
            return None
        got = run_id_of((tmp / SPEC).read_bytes())
        if got != run_id:
            problems.append(f"run: the spec served by peer {peer} for run {run_id} hashes to {got}: it is not that "
                            "run's spec; refusing it")
            logger.warning(problems[-1])
            return None
        try:
            load_run(tmp, run_id)  # the files must match the spec's hashes too
        except RunSpecError as e:
            problems.append(f"run: the files served by peer {peer} do not match run {run_id}'s spec ({e})")
            return None
        if dest.exists():
            shutil.rmtree(dest)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("fetched the spec of run %s from peer %s into %s", run_id, peer[-8:], dest)
    return load_run(dest, run_id)


def join_run(dht_cfg, run_id: str | None, root: str | Path, timeout: float) -> RunSpec:
    """Fetch (or find locally) the spec of the run to join, through a short-lived client-mode DHT."""
    import dataclasses

    from .network import shutdown_dht, start_dht

    dht = start_dht(dataclasses.replace(dht_cfg, client_mode=True))
    try:
        return fetch_run(dht, run_id, root, timeout)
    finally:
        shutdown_dht(dht)
