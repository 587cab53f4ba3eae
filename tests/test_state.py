"""state.py: checkpoints round-trip everything, survive corruption and a writer killed mid-write."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from p2p_photon import state
from p2p_photon.config import InnerConfig
from p2p_photon.hashing import theta_hash
from p2p_photon.inner import InnerTrainer
from p2p_photon.model import build_model
from tests.helpers import PYTHON, checkpoint_payload, python_env, wait_until


@pytest.mark.parametrize("opt", ["adamw8bit", "adamw"])
def test_round_trip_restores_everything(tmp_path, opt):
    p = checkpoint_payload(3, opt)
    path = state.save_checkpoint(tmp_path, p, keep=2)
    back = state.load_latest(tmp_path, "fp")
    assert back.path == path
    assert theta_hash([back.theta[n] for n in p.theta]) == p.meta["theta"]  # safetensors sorts keys
    assert torch.equal(back.outer[0], p.outer[0])
    assert back.meta["data_cursor"] == {"epoch": 1, "position": 7} and back.meta["round"] == 3
    # the optimizer state loads into a fresh optimizer and matches tensor for tensor
    model = build_model("nano", 256, 32, seed=0)
    trainer = InnerTrainer(model, InnerConfig(optimizer=opt), torch.device("cpu"))
    trainer.optimizer.load_state_dict(back.inner)
    def flat(sd):
        return [v for st in sd["state"].values() for v in (st.values() if isinstance(st, dict) else [])]

    assert len(flat(trainer.optimizer.state_dict())) == len(flat(p.inner))
    assert (tmp_path / path.name / "config.toml").is_file()


def test_rng_restore_reproduces_the_stream():
    rng = state.capture_rng()
    a = torch.rand(5)
    state.restore_rng(rng)
    assert torch.equal(a, torch.rand(5))


def test_keeps_last_two_and_falls_back_from_a_corrupt_one(tmp_path, caplog):
    for r in (1, 2, 3):
        state.save_checkpoint(tmp_path, checkpoint_payload(r), keep=2)
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["ckpt-00000003", "ckpt-00000002"]
    newest = tmp_path / "ckpt-00000003" / "theta.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    back = state.load_latest(tmp_path)
    assert back.meta["round"] == 2
    assert "ckpt-00000003" in caplog.text and "falling back" in caplog.text


def test_all_corrupt_is_a_clear_error_naming_the_file(tmp_path):
    state.save_checkpoint(tmp_path, checkpoint_payload(1), keep=2)
    f = tmp_path / "ckpt-00000001" / "meta.json"
    f.write_text("{}")
    with pytest.raises(state.CheckpointError, match="ckpt-00000001"):
        state.load_latest(tmp_path)


def test_fingerprint_mismatch_is_refused(tmp_path):
    state.save_checkpoint(tmp_path, checkpoint_payload(1), keep=2)
    with pytest.raises(state.CheckpointError, match="fingerprint"):
        state.load_latest(tmp_path, "other")


WRITER = textwrap.dedent("""
    import os, sys, threading
    from pathlib import Path
    from p2p_photon import state
    from tests.helpers import checkpoint_payload

    root, stage, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def pause(at, tmp):
        if at == stage:
            Path(f"{marker}.part").write_text(str(tmp))
            os.replace(f"{marker}.part", marker)
            threading.Event().wait()  # paused inside save_checkpoint until the test kills us

    state.write_hook = pause
    state.save_checkpoint(root, checkpoint_payload(2), keep=2)
""")


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("stage", ["theta", "complete"])
@pytest.mark.timeout(120)
def test_kill_during_write_leaves_previous_checkpoint_loadable(tmp_path, stage):
    """SIGKILL a writer paused inside save_checkpoint (right after θ's tensor file is written, or with
    every file written, just before the rename): its partial copy is on disk, proving the write was under
    way, yet only the previous checkpoint is visible and it loads byte for byte intact."""
    root, marker, log = tmp_path / "ckpt", tmp_path / "paused", tmp_path / "writer.log"
    first = checkpoint_payload(1)
    state.save_checkpoint(root, first, keep=2)
    before = _files(root / "ckpt-00000001")
    with open(log, "w") as out:
        proc = subprocess.Popen([PYTHON, "-c", WRITER, str(root), stage, str(marker)], env=python_env(),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        paused = lambda: marker.exists() or proc.poll() is not None  # noqa: E731
        wait_until(paused, 90, f"the writer to pause at {stage!r}")
        assert proc.poll() is None, log.read_text()[-3000:]
        partial = Path(marker.read_text())
        assert partial.parent == root and partial.name.startswith(".tmp-ckpt-00000002-")
        assert (partial / "theta.safetensors").is_file()
        assert (partial / state.MANIFEST).is_file() == (stage == "complete")
    finally:
        proc.kill()
        proc.wait()
    assert partial.is_dir()  # the kill interrupted the write and left its partial copy
    assert [p.name for p in state.list_checkpoints(root)] == ["ckpt-00000001"]  # the partial one is hidden
    back = state.load_latest(root, "fp")
    assert back.meta["round"] == 1 and theta_hash([back.theta[n] for n in first.theta]) == first.meta["theta"]
    assert _files(root / "ckpt-00000001") == before
    state.save_checkpoint(root, checkpoint_payload(3), keep=2)  # removes the dead writer's partial copy
    assert not partial.exists()
    assert [p.name for p in state.list_checkpoints(root)] == ["ckpt-00000003", "ckpt-00000001"]


def test_read_only_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/p2p-photon-cannot-write-here"  # root ignores permissions; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "ck")
    with pytest.raises(state.CheckpointError, match="could not write a checkpoint"):
        state.save_checkpoint(target, checkpoint_payload(1))
