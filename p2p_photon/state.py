"""Checkpoints: atomic, safetensors, verified on load, the last K kept.

A checkpoint is a directory `ckpt-<round>` holding θ (`theta.safetensors`), the outer
optimizer's momentum, the inner optimizer's state (tensors in safetensors, the rest JSON),
RNG states, counters and the data cursor (`meta.json`), the resolved config, and last a
`MANIFEST.json` with the sha256 of every file. It is written into a temporary directory,
fsynced and renamed into place, so a crash mid-write never damages an earlier checkpoint; a
write that fails (full disk, read-only directory) removes its partial copy and raises
`CheckpointError`. No pickle anywhere.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Config, to_toml
from .errors import EXIT_USAGE, UserError
from .files import sha256_file

logger = logging.getLogger(__name__)

PREFIX = "ckpt-"
MANIFEST = "MANIFEST.json"


class CheckpointError(UserError):
    """One-line, user-facing checkpoint problem naming the file and the fix."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint belongs to another run fingerprint (a config error: exit code 2)."""

    exit_code = EXIT_USAGE


@dataclass
class CheckpointPayload:
    theta: dict[str, torch.Tensor]
    outer: list[torch.Tensor]
    inner: dict[str, Any]
    meta: dict[str, Any]
    rng: dict[str, Any]
    config: Config | None = None
    path: Path | None = field(default=None, compare=False)


# ----------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=_jsonable(random.getstate()),
                numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]])


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(_tupled(rng["python"]))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


# ----------------------------------------------------------------------------- optimizer state


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any tensor anywhere in the (nested) state dict goes to safetensors, the rest to JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if torch.is_tensor(x):
            tensors[path] = x.detach().cpu().clone()  # bnb shares qmaps between params
            return {"__tensor__": path}
        if isinstance(x, dict):
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        return x

    return tensors, walk(sd, "opt")


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: Any) -> Any:
    if isinstance(plain, dict) and "__tensor__" in plain:
        return tensors[plain["__tensor__"]]
    if isinstance(plain, dict) and "__dict__" in plain:
        return {k: _join_optimizer_state(tensors, v) for k, v in plain["__dict__"]}
    if isinstance(plain, list):
        return [_join_optimizer_state(tensors, v) for v in plain]
    return plain


split_optimizer_state, join_optimizer_state = _split_optimizer_state, _join_optimizer_state  # for peer/ranks.py


# ----------------------------------------------------------------------------- writing


write_hook: Callable[[str, Path], None] | None = None
"""Test-only, off unless a test sets it: `save_checkpoint` calls `write_hook(stage, tmp)` with stage
"theta" right after θ's tensor file is written into the temporary directory `tmp` (the other files are
not), and "complete" once every file and the manifest are in `tmp`, just before the rename. A test's hook
can write a marker and pause there, so that the writer is killed in the middle of a write for certain
(tests/test_state.py)."""


def _test_hook(stage: str, tmp: Path) -> None:
    if write_hook is not None:
        write_hook(stage, tmp)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, p: CheckpointPayload) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in p.theta.items()}, tmp / "theta.safetensors")
    _test_hook("theta", tmp)
    outer = {f"outer.{i}": t.detach().cpu().contiguous() for i, t in enumerate(p.outer)}
    save_file(outer or {"empty": torch.zeros(0)}, tmp / "outer.safetensors")
    inner_tensors, inner_plain = _split_optimizer_state(p.inner)
    save_file(inner_tensors or {"empty": torch.zeros(0)}, tmp / "inner.safetensors")
    save_file({"torch_rng": p.rng["torch"]}, tmp / "rng.safetensors")
    rng_rest = {k: v for k, v in p.rng.items() if k != "torch"}
    _fsync_write(tmp / "inner.json", json.dumps(inner_plain).encode())
    _fsync_write(tmp / "meta.json", json.dumps(dict(p.meta, rng=rng_rest, n_outer=len(p.outer))).encode())
    if p.config is not None:
        _fsync_write(tmp / "config.toml", to_toml(p.config).encode())
    for f in tmp.iterdir():  # safetensors' save_file does not fsync
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    manifest = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
    _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())


def save_checkpoint(directory: str | Path, payload: CheckpointPayload, *, keep: int = 2) -> Path:
    """Write `payload` as ckpt-<round> atomically; keep the newest `keep` checkpoints.

    On any write error the partial copy is removed, the previous checkpoints are left as they
    were, and CheckpointError says what went wrong and what to do."""
    root = Path(directory)
    final = root / f"{PREFIX}{int(payload.meta['round']):08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_files(tmp, payload)
        _fsync_dir(tmp)
        _test_hook("complete", tmp)
        _replace(tmp, final)
        _fsync_dir(root)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_error(root, e)) from None
    _prune(root, keep)
    return final


def _replace(tmp: Path, final: Path) -> None:
    """Rename tmp to final; the same round written again (e.g. at shutdown) replaces it atomically."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)  # put the previous one back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale(root: Path) -> None:
    """Partial copies left by a process that died mid-write (they can fill a disk); a checkpoint
    it had moved aside to replace it goes back into place."""
    for kind in ("tmp", "old"):
        for p in root.glob(f".{kind}-{PREFIX}*"):
            name, _, pid = p.name[len(kind) + 2:].rpartition("-")
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not (root / name).exists():
                os.rename(p, root / name)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _write_error(root: Path, e: BaseException) -> str:
    """'could not write a checkpoint in DIR: <reason>; <fix> (earlier checkpoints are untouched)'."""
    code, reason = getattr(e, "errno", None), getattr(e, "strerror", None)
    if isinstance(e, SafetensorError):  # 'Error while serializing: I/O error: File too large (os error 27)'
        text = str(e)
        reason = text.rpartition("I/O error: ")[2].split(" (os error")[0] or text
        digits = text.rpartition("(os error ")[2].rstrip(")")
        code = int(digits) if digits.isdigit() else None
    if code in _FULL:
        fix = "free some space, or point checkpoint.dir at a disk with room"
    elif code in _DENIED:
        fix = "make it writable, or point checkpoint.dir at a writable directory"
    else:
        fix = "check free space and permissions"
    return f"could not write a checkpoint in {root}: {reason or e}; {fix} (earlier checkpoints are untouched)"


def check_writable(directory: str | Path, what: str = "checkpoint.dir") -> Path:
    """Fail fast, before any training, when nothing could be written to `directory` (created if missing)."""
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        not_dir = root.exists() and not root.is_dir()
        problem = "is not a directory" if not_dir else f"is not writable ({e.strerror or e})"
        raise CheckpointError(f"{what} {root} {problem}: fix its permissions or point {what} at a writable "
                              "directory") from None
    return root


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Newest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True)


# ----------------------------------------------------------------------------- reading


def verify(path: Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is present and intact."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        why = f"checkpoint {path} has no readable {MANIFEST} (incomplete or corrupt)"
        raise CheckpointError(why) from None
    for name, digest in manifest.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is corrupt or truncated (sha256 mismatch)")


def load_checkpoint(path: str | Path) -> CheckpointPayload:
    path = Path(path)
    verify(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        outer = load_file(path / "outer.safetensors")
        inner_plain = json.loads((path / "inner.json").read_text())
        inner = _join_optimizer_state(load_file(path / "inner.safetensors"), inner_plain)
        rng = dict(meta.pop("rng"), torch=load_file(path / "rng.safetensors")["torch_rng"])
        theta = load_file(path / "theta.safetensors")
    except Exception as e:  # verified files that still do not parse: report, never crash
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from None
    outer_list = [outer[f"outer.{i}"] for i in range(int(meta.pop("n_outer")))]
    return CheckpointPayload(theta=theta, outer=outer_list, inner=inner, meta=meta, rng=rng, path=path)


def load_latest(directory: str | Path, fingerprint: str | None = None) -> CheckpointPayload | None:
    """The newest valid checkpoint; a corrupt one is reported and the previous one used.
    None when there is none at all; CheckpointError when all are unusable."""
    candidates = list_checkpoints(directory)
    errors = []
    for i, path in enumerate(candidates):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            if i + 1 < len(candidates):
                logger.warning("%s; falling back to the previous checkpoint", e)
            errors.append(str(e))
            continue
        if fingerprint is not None and ckpt.meta.get("fingerprint") != fingerprint:
            raise CheckpointMismatch(
                f"checkpoint {path} belongs to run fingerprint {ckpt.meta.get('fingerprint')}, this config "
                f"has {fingerprint}: use the config it was written with, or another checkpoint.dir")
        return ckpt
    if errors:
        older = f" (and {len(errors) - 1} older checkpoint(s) too)" if len(errors) > 1 else ""
        raise CheckpointError(f"no usable checkpoint in {directory}: {errors[0]}{older}; move the damaged "
                              "checkpoints away (or run without --resume) to start fresh")
    return None
