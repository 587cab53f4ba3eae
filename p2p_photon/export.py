"""`p2p-photon export`: a swarm checkpoint out as a Hugging Face model directory.

A peer's checkpoints stay in our own layout (state.py); export turns one of them into what the rest
of the world loads: safetensors weights, config.json, generation_config.json, the run's tokenizer
and a model card. Hashes are the evidence: the checkpoint is verified against its manifest, and θ is
hashed again once it sits in the model; unless that is the hash the checkpoint recorded, nothing is
written. The tokenizer is the run's own, found in the data cache by the run fingerprint (which
covers the tokenizer's hash), never re-trained. OUT is built in a temporary sibling directory and
renamed into place, so a failed export leaves OUT as it was.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from . import data, state
from .baseline import write_hf_model
from .config import Config, fingerprint, load_config
from .errors import EXIT_USAGE, UserError
from .hashing import theta_hash
from .inner import evaluate, perplexity
from .model import build_model, count_params

logger = logging.getLogger(__name__)

CARD = "README.md"


class ExportError(UserError):
    """One-line, user-facing export problem (exit code 1): no usable checkpoint, θ that does not hash
    to the recorded value, a missing or foreign tokenizer, an OUT that cannot be written."""


class OutputNotEmpty(ExportError):
    """OUT already holds something and --force was not given: the command as given would destroy data
    (a usage error, exit code 2, like `identity new` refusing to overwrite a key)."""

    exit_code = EXIT_USAGE


def export_checkpoint(path: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                      force: bool = False, eval_ppl: bool = True) -> Path:
    """Write checkpoint `path` (a ckpt-XXXXXXXX directory, or a checkpoint.dir: its newest valid one)
    to `out` as a Hugging Face model directory and return `out`.

    `tokenizer` is a tokenizer.json to use instead of the one in the run's prepared data; `force`
    replaces a non-empty `out`; `eval_ppl` measures held-out perplexity for the model card (only
    possible from the prepared data, so not with `tokenizer`)."""
    out = Path(os.path.abspath(out))  # "." or "x/.." have no usable name or parent for the temporary sibling
    check_output(out, Path(path), force)
    ckpt = find_checkpoint(path)
    cfg = saved_config(ckpt)
    tok, prep = run_tokenizer(cfg, ckpt, tokenizer)
    model = load_model(ckpt, cfg)
    ppl = _perplexity_text(model, prep, cfg, eval_ppl)
    card = model_card(ckpt, cfg, model, ppl)
    _write_atomically(out, force, lambda tmp: _write(tmp, model, tok, cfg, card))
    logger.info("exported round %d (θ %s) to %s", ckpt.meta["round"], ckpt.meta["theta"], out)
    return out


# ----------------------------------------------------------------------------- the checkpoint


def find_checkpoint(path: str | Path) -> state.CheckpointPayload:
    """One checkpoint, verified; a checkpoint.dir gives its newest one that verifies (state.load_latest
    warns about and skips damaged newer ones)."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"no checkpoint found: {p} does not exist")
    if (p / state.MANIFEST).exists() or (p.name.startswith(state.PREFIX) and p.name[len(state.PREFIX):].isdigit()):
        ckpt = state.load_checkpoint(p)
    else:
        ckpt = _newest_valid(p)
    logger.info("checkpoint %s: round %s, θ %s", ckpt.path, ckpt.meta.get("round"), ckpt.meta.get("theta"))
    return ckpt


def _newest_valid(root: Path) -> state.CheckpointPayload:
    """Like state.load_latest, with export's wording: a damaged newer checkpoint is skipped with a
    warning, and a directory with none that verifies is an error naming the newest one's problem."""
    candidates = state.list_checkpoints(root)
    if not candidates:
        raise ExportError(f"no checkpoint found in {root}: give a checkpoint ({state.PREFIX}XXXXXXXX) or the "
                          "checkpoint.dir of a peer that wrote one")
    problems = []
    for i, path in enumerate(candidates):
        try:
            return state.load_checkpoint(path)
        except state.CheckpointError as e:
            if i + 1 < len(candidates):
                logger.warning("%s; trying the previous checkpoint", e)
            problems.append(str(e))
    older = f" (and {len(problems) - 1} older one(s))" if len(problems) > 1 else ""
    raise ExportError(f"no valid checkpoint in {root}: {problems[0]}{older}")


def saved_config(ckpt: state.CheckpointPayload) -> Config:
    """The resolved config saved beside θ: it says which model to rebuild and where the data cache is."""
    f = ckpt.path / "config.toml"
    if not f.is_file():
        raise ExportError(f"checkpoint {ckpt.path} has no config.toml: export needs the run's config to "
                          "rebuild the model")
    missing = [k for k in ("round", "global_step", "total_samples", "fingerprint", "theta") if k not in ckpt.meta]
    if missing:
        raise ExportError(f"checkpoint {ckpt.path}: meta.json lacks {', '.join(missing)}; it was not written "
                          "by a p2p-photon peer")
    return load_config(f)


def load_model(ckpt: state.CheckpointPayload, cfg: Config) -> torch.nn.Module:
    """The run's model with θ loaded by name; refused unless it hashes to the checkpoint's θ hash.

    The vocabulary is data.vocab_size, which is what `data.load_prepared` reports as the model's
    embedding size (the trained tokenizer may use fewer ids)."""
    m = cfg.model
    model = build_model(m.preset, cfg.data.vocab_size, m.seq_len, cfg.seed, "cpu")
    params = dict(model.named_parameters())
    problem = _fit_problem(params, ckpt.theta)
    if problem:
        raise ExportError(f"checkpoint {ckpt.path} does not fit model preset {m.preset} (vocab "
                          f"{cfg.data.vocab_size}): {problem}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.theta[name])
    got = theta_hash(model)
    if got != ckpt.meta["theta"]:
        raise ExportError(f"checkpoint {ckpt.path}: θ hashes to {got} once loaded, its meta.json says "
                          f"{ckpt.meta['theta']}; refusing to export weights that are not the round's θ")
    return model.eval()


def _fit_problem(params: dict[str, torch.nn.Parameter], theta: dict[str, torch.Tensor]) -> str | None:
    """Why θ cannot be loaded into the model by name (missing, unexpected or misshapen tensors), or None."""
    missing, extra = sorted(set(params) - set(theta)), sorted(set(theta) - set(params))
    shapes = [n for n in params if n in theta and tuple(theta[n].shape) != tuple(params[n].shape)]
    for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
        if names:
            more = f" (+{len(names) - 1} more)" if len(names) > 1 else ""
            return f"{what} tensor {names[0]}{more}"
    return None


# ----------------------------------------------------------------------------- the tokenizer


def run_tokenizer(cfg: Config, ckpt: state.CheckpointPayload, explicit: str | Path | None):
    """(Hugging Face tokenizer, prepared data or None): the run's tokenizer from the data cache, or the
    file given; either way it must be the one the run fingerprint names."""
    if explicit is None and cfg.data.run_spec:  # a run joined with --data: the spec holds the tokenizer
        prep = Path(cfg.data.run_spec)
        tok = tokenizer_from_file(prep / "tokenizer.json", cfg, ckpt.meta["fingerprint"])
    elif explicit is None:
        prep = find_prepared(cfg, ckpt)
        tok = prep.tokenizer()
    else:
        prep, tok = None, tokenizer_from_file(explicit, cfg, ckpt.meta["fingerprint"])
    if len(tok) > cfg.data.vocab_size:
        raise ExportError(f"the tokenizer has {len(tok)} tokens, more than the model's vocabulary "
                          f"({cfg.data.vocab_size}): it is not this run's tokenizer")
    return tok, prep


def find_prepared(cfg: Config, ckpt: state.CheckpointPayload) -> data.Prepared:
    """The prepared data directory whose tokenizer gives the checkpoint's run fingerprint.

    Found by reading the cache, never by preparing: re-preparing could silently train another
    tokenizer (a changed corpus) and take minutes."""
    fp, caches = ckpt.meta["fingerprint"], _cache_dirs(cfg, ckpt.path)
    for cache in caches:
        for d in sorted(cache.glob("data-*")):
            digest = _read_json(d / "meta.json").get("tokenizer_sha256")
            if isinstance(digest, str) and fingerprint(cfg, digest) == fp:
                logger.info("tokenizer from prepared data %s", d)
                return data.load_prepared(d)
    where = " or ".join(str(c) for c in caches)
    raise ExportError(f"no prepared data of run fingerprint {fp} in {where} (data.cache_dir): run `p2p-photon "
                      f"data prepare -c {ckpt.path / 'config.toml'}` where the run's corpus is, or give "
                      "--tokenizer PATH/tokenizer.json")


def _cache_dirs(cfg: Config, ckpt_path: Path) -> list[Path]:
    """data.cache_dir as the export runs; a relative one also from the peer's working directory,
    which is where checkpoint.dir (relative too) leads when the checkpoint is still inside it."""
    cache = Path(cfg.data.cache_dir).expanduser()
    dirs = [cache.resolve()]
    setting = Path(cfg.checkpoint.dir)
    root = ckpt_path.resolve().parent
    n = len(setting.parts)
    if not cache.is_absolute() and not setting.is_absolute() and root.parts[-n:] == setting.parts:
        dirs.append((Path(*root.parts[:-n]) / cache).resolve())
    return list(dict.fromkeys(dirs))


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def tokenizer_from_file(path: str | Path, cfg: Config, fp: str):
    """A tokenizer.json given on the command line (or a directory holding one), with the special tokens
    of `data.Prepared.tokenizer`; refused unless its hash gives the run fingerprint `fp`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise ExportError(f"tokenizer {p} not found: give the run's tokenizer.json (it is in the prepared data, "
                          f"{cfg.data.cache_dir}/data-*/tokenizer.json)")
    try:
        Tokenizer.from_file(str(f))
    except Exception:  # tokenizers raises plain Exceptions for anything it cannot parse
        raise ExportError(f"{f} is not a tokenizer file (the tokenizers library cannot read it): give the "
                          "run's tokenizer.json") from None
    if fingerprint(cfg, hashlib.sha256(f.read_bytes()).hexdigest()) != fp:
        raise ExportError(f"{f} is not this run's tokenizer (with it the run fingerprint would not be {fp}): "
                          "give the tokenizer.json of the run's prepared data")
    specials = dict(eos_token=data.EOS, bos_token=data.EOS, unk_token=data.EOS, pad_token=data.EOS)
    return PreTrainedTokenizerFast(tokenizer_file=str(f), clean_up_tokenization_spaces=False, **specials)


# ----------------------------------------------------------------------------- the model card


def _perplexity_text(model, prep: data.Prepared | Path | None, cfg: Config, eval_ppl: bool) -> str:
    """Held-out perplexity for the card, measured now (the checkpoint does not record one), or why not."""
    if not eval_ppl:
        return "unknown (not measured: --no-eval)"
    if prep is None:
        return "unknown (not measured: --tokenizer given, so the run's prepared held-out data was not read)"
    if isinstance(prep, Path):  # a run spec's directory: its public eval set
        batches = data.fixed_batches(prep / "eval.bin", "uint32", seq_len=cfg.model.seq_len,
                                     batch_size=cfg.inner.batch_size, n_batches=cfg.logging.eval_batches)
    else:
        batches = data.heldout_batches(prep, seq_len=cfg.model.seq_len, batch_size=cfg.inner.batch_size,
                                       n_batches=cfg.logging.eval_batches)
    logger.info("measuring held-out perplexity on %d batches", len(batches))
    with torch.no_grad():
        loss = evaluate(model, batches, cfg.inner, torch.device("cpu"))
    tokens = sum(b[:, 1:].numel() for b in batches)
    where = "the run's public eval set" if isinstance(prep, Path) else "the run's held-out split"
    return f"{perplexity(loss):.2f} (at export, on {tokens:,} tokens of {where})"


def _outer_text(cfg: Config) -> str:
    o, r = cfg.outer, cfg.outer.resolved()
    text = f"{o.preset} (lr {r['lr']:g}, momentum {r['momentum']:g}{', Nesterov' if r['nesterov'] else ''})"
    if o.block_cycle:
        text += f", block cycling over {o.block_cycle} groups ({o.block_order})"
    return text


def card_rows(ckpt: state.CheckpointPayload, cfg: Config, model, ppl: str) -> list[tuple[str, Any]]:
    """What the card states: only what the checkpoint and its config record, 'unknown' for the rest."""
    m = ckpt.meta
    return [
        ("run id", cfg.dht.run_id),
        ("run fingerprint", m["fingerprint"]),
        ("checkpoint", ckpt.path.name),
        ("model", f"{cfg.model.preset}, {count_params(model):,} parameters, vocab {cfg.data.vocab_size}, "
                  f"seq_len {cfg.model.seq_len}, seed {cfg.seed}"),
        ("rounds", m["round"]),
        ("failed rounds", m.get("failed_rounds", "unknown")),
        ("global step", m["global_step"]),
        ("tokens", f"{int(m['total_samples']) * cfg.model.seq_len:,} ({m['total_samples']:,} samples × "
                   f"seq_len {cfg.model.seq_len})"),
        ("outer optimizer", _outer_text(cfg)),
        ("inner optimizer", f"{cfg.inner.optimizer}, lr {cfg.inner.lr:g}, batch {cfg.inner.batch_size}"),
        ("compression", cfg.averaging.compression),
        ("contributing peers", "unknown (checkpoints do not record it)"),
        ("held-out perplexity", ppl),
        ("θ hash", f"`{m['theta']}` (p2p_photon.hashing.theta_hash of the parameters, verified at export)"),
    ]


def model_card(ckpt: state.CheckpointPayload, cfg: Config, model, ppl: str) -> str:
    """README.md for OUT: Hugging Face metadata, the table of `card_rows`, and how to load it offline."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in card_rows(ckpt, cfg, model, ppl))
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [p2p_photon, federated-learning, llama]
---

# {cfg.dht.run_id}, round {ckpt.meta['round']}

The global model θ of the p2p_photon swarm `{cfg.dht.run_id}` after round {ckpt.meta['round']}: federated
pre-training among peers on a hivemind DHT (local training, averaged pseudo-gradients), exported by `p2p-photon export` from
checkpoint `{ckpt.path.name}`. Weights start from a seeded random init; the tokenizer is the run's own
byte-level BPE. `p2p_photon.toml` is the run's resolved config.

| | |
|---|---|
{rows}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```
"""


# ----------------------------------------------------------------------------- writing OUT


def check_output(out: Path, source: Path, force: bool) -> None:
    """Fail before any loading when OUT could not be written or holds something (without --force)."""
    if out.exists() and not out.is_dir():
        raise OutputNotEmpty(f"{out} exists and is not a directory: remove it or pick another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputNotEmpty(f"{out} is not empty: pick a new or empty directory for -o, or add --force to "
                             "replace its contents")
    if source.exists() and (out.resolve() == source.resolve() or out.resolve() in source.resolve().parents):
        raise OutputNotEmpty(f"-o {out} holds the checkpoint {source} itself: pick another directory")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """OUT is created inside its nearest existing ancestor: that must be a directory we can write in."""
    base = out.absolute().parent
    while not base.exists():
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "is not a directory")
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {base} {e.strerror or e}; pick a writable -o") from None


def _write(tmp: Path, model, tok, cfg: Config, card: str) -> None:
    write_hf_model(model, tok, cfg, tmp)
    (tmp / CARD).write_text(card, encoding="utf-8")
    for f in tmp.rglob("*"):  # neither save_pretrained nor safetensors fsyncs
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _write_atomically(out: Path, force: bool, build: Callable[[Path], None]) -> None:
    """Build OUT in a temporary sibling and rename it into place; on any failure remove the sibling and
    leave OUT as it was (a write error becomes one ExportError line)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
        os.chmod(tmp, 0o755)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}; pick a writable -o") from None
    try:
        build(tmp)
        _publish(tmp, out, force)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"could not write {out}: {getattr(e, 'strerror', None) or e} (it is left as it "
                          "was)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename tmp to OUT. An empty OUT is replaced; a non-empty one only with --force, moved aside first
    and put back if the rename fails."""
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif not force:  # filled while we were exporting
        raise OutputNotEmpty(f"{out} is not empty: pick a new or empty directory for -o, or add --force")
    else:
        old = out.with_name(f".old-{out.name}-{os.getpid()}")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
