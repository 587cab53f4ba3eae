import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from p2p_photon import state
from p2p_photon.config import Config, InnerConfig
from p2p_photon.inner import InnerTrainer
from p2p_photon.model import build_model, theta_hash


def _payload(round_no: int, opt: str = "adamw8bit", seed: int = 0) -> state.CheckpointPayload:
    model = build_model("nano", 256, 32, seed=seed)
    trainer = InnerTrainer(model, InnerConfig(optimizer=opt, warmup_steps=0), torch.device("cpu"))
    trainer.step(lambda: torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(round_no)), 0)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    return state.CheckpointPayload(theta=theta, outer=[torch.randn(3, 3)], inner=trainer.optimizer.state_dict(),
                                   meta=dict(round=round_no, global_step=10 * round_no, fingerprint="fp",
                                             theta=theta_hash(list(theta.values())), data_cursor=dict(epoch=1, position=7)),
                                   rng=state.capture_rng(), config=Config())


@pytest.mark.parametrize("opt", ["adamw8bit", "adamw"])
def test_round_trip_restores_everything(tmp_path, opt):
    p = _payload(3, opt)
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
        state.save_checkpoint(tmp_path, _payload(r), keep=2)
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["ckpt-00000003", "ckpt-00000002"]
    newest = tmp_path / "ckpt-00000003" / "theta.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    back = state.load_latest(tmp_path)
    assert back.meta["round"] == 2
    assert "ckpt-00000003" in caplog.text and "falling back" in caplog.text


def test_all_corrupt_is_a_clear_error_naming_the_file(tmp_path):
    state.save_checkpoint(tmp_path, _payload(1), keep=2)
    f = tmp_path / "ckpt-00000001" / "meta.json"
    f.write_text("{}")
    with pytest.raises(state.CheckpointError, match="ckpt-00000001"):
        state.load_latest(tmp_path)


def test_fingerprint_mismatch_is_refused(tmp_path):
    state.save_checkpoint(tmp_path, _payload(1), keep=2)
    with pytest.raises(state.CheckpointError, match="fingerprint"):
        state.load_latest(tmp_path, "other")


def test_kill_during_write_leaves_previous_checkpoint_loadable(tmp_path):
    state.save_checkpoint(tmp_path, _payload(1), keep=2)
    # a child writes checkpoints in a loop; SIGKILL it mid-write, several times
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.getcwd()!r})
        from tests.test_state import _payload
        from p2p_photon import state
        p = _payload(2)
        print("ready", flush=True)
        for i in range(1000):
            p.meta["round"] = 2 + i
            state.save_checkpoint({str(tmp_path)!r}, p, keep=2)
    """)
    for delay in (0.3, 0.55, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        import time
        time.sleep(delay)
        proc.kill()
        proc.wait()
        back = state.load_latest(tmp_path)  # never raises: the newest complete checkpoint loads
        assert back is not None and json.loads((back.path / "MANIFEST.json").read_text())


def test_read_only_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/p2p-photon-cannot-write-here"  # root ignores permissions; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "ck")
    with pytest.raises(state.CheckpointError, match="could not write a checkpoint"):
        state.save_checkpoint(target, _payload(1))
