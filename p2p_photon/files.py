"""Small file formats: the bootstrap's multiaddrs JSON, and JSON written atomically.

The bootstrap writes its multiaddrs with `write_json_atomic`, so that a script or a test polling
for the file never reads half of it; peers, the monitor and the scripts read it back with
`read_maddrs_file`. Benchmarks write their results the same way. This module imports neither
hivemind nor torch, so the command line can read a maddrs file before it starts anything heavy.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import suppress
from pathlib import Path


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    """Write JSON to a temporary file in the same directory, then rename it over `path`
    (a reader sees the old file or the new one, never a partial one)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_maddrs_file(path: str | os.PathLike) -> list[str]:
    """The multiaddrs from a file written by `p2p-photon bootstrap --maddrs-file`.

    Raises NetworkError (one line, with the fix) when it is not such a file."""
    try:
        maddrs = json.loads(Path(path).read_text(encoding="utf-8"))["maddrs"]
        if not isinstance(maddrs, list) or not maddrs:
            raise ValueError("'maddrs' is not a non-empty list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        from .network import NetworkError  # imports hivemind: only on this error path

        raise NetworkError(f"--initial-peers-file {path}: not a bootstrap maddrs file ({e}); pass the file "
                           "written by `p2p-photon bootstrap --maddrs-file`") from None
    return [str(m) for m in maddrs]


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoints, tokenizers, run specs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
