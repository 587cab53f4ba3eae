"""Issue 16: a peer bigger than one device. torch.distributed (gloo, CPU) inside one peer, one swarm identity.

Real ranks (torchrun, `peer --nproc 2`) and real DHTs on 127.0.0.1; nothing is mocked."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from p2p_photon.launch import LocalSwarm
from tests.helpers import PYTHON, alive, descendants, python_env, wait_until

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(400)]

WORKER = str(Path(__file__).with_name("ranks_worker.py"))
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1"]


def _run_worker(cmd: list[str], out: Path, sets: list[str]) -> tuple[dict, list[dict]]:
    args = [str(out)] + [x for s in sets for x in ("--set", s)]
    # faulthandler: a rank that aborts in C++ prints every thread's stack (the fsdp2 case's rank 1 once aborted
    # at exit, "terminate called without an active exception": RankTrainer.release is the fix)
    env = dict(python_env(), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    r = subprocess.run([*cmd, WORKER, *args], env=env, cwd=out.parent, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:  # the whole output to a file; the message leads with a rank's fatal-error stack
        log = (r.stdout or "") + (r.stderr or "")
        Path(f"{out}.log").write_text(log)
        fatal = log.find("Fatal Python error")
        head = log[fatal:fatal + 6000] if fatal >= 0 else ""
        outputs = [p.name for p in out.parent.glob(f"{out.name}.*")]
        raise AssertionError(f"exit {r.returncode}; outputs written: {outputs}; full log {out}.log\n{head}\n"
                             f"...\n{log[-3000:]}")
    return load_file(f"{out}.safetensors"), json.loads(Path(f"{out}.json").read_text())


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory, data_cache):
    """A one-process peer with batch 8: two rounds of 3 steps each (tests/ranks_worker.py)."""
    d = tmp_path_factory.mktemp("one-rank")
    sets = _worker_sets(data_cache, d) + ["inner.batch_size=8"]
    return _run_worker([PYTHON], d / "one", sets)


def _worker_sets(data_cache, d: Path) -> list[str]:
    from tests.helpers import SMALL_DATA

    return [*SMALL_DATA, f"data.cache_dir={data_cache}", "model.seq_len=64", "inner.warmup_steps=2",
            "inner.optimizer=adamw", "rounds.max_local_steps=3", "logging.progress_bar=false",
            "logging.eval_batches=2", f"checkpoint.dir={d / 'ckpt'}", "dht.run_id=ranks-delta"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_ranks_form_the_delta_of_one_rank_with_twice_the_batch(tmp_path, data_cache, one_rank_reference,
                                                                  parallel):
    """Two ranks with batch 4 each see the rows of one rank's batch of 8: Δ is the same (allclose), in the
    first round and in the second, which starts from a θ_local that rank 0 alone reset (so the other rank
    must have received it), and the peer reports the samples of both ranks."""
    ref, ref_stats = one_rank_reference
    sets = _worker_sets(data_cache, tmp_path) + ["inner.batch_size=4", f"inner.parallel={parallel}"]
    got, stats = _run_worker(TORCHRUN, tmp_path / "two", sets)
    assert sorted(got) == sorted(ref)
    for r in (0, 1):
        assert stats[r]["samples"] == ref_stats[r]["samples"] == 3 * 8
        assert stats[r]["tokens"] == ref_stats[r]["tokens"]
        assert abs(stats[r]["loss"] - ref_stats[r]["loss"]) < 1e-4
    # Δ is ~1e-2 per entry (3 AdamW steps at lr ~3e-3); the ranks' gradient mean sums in another order
    bad = [k for k in ref if not torch.allclose(got[k], ref[k], rtol=1e-3, atol=1e-5)]
    assert not bad, [(k, float((got[k] - ref[k]).abs().max())) for k in bad[:5]]
    assert max(float((got[k] - ref[k]).norm() / ref[k].norm()) for k in ref if ref[k].norm() > 0) < 1e-3
    assert any(float(ref[k].abs().max()) > 1e-3 for k in ref)  # Δ is not trivially zero


def _rounds(swarm, name):
    return {h["round"]: h for h in swarm.summary(name)["history"] if h["ok"]}


def test_a_two_rank_peer_and_a_one_rank_peer_hold_the_same_theta_every_round(tmp_path, swarm_overrides):
    """`peer --nproc 2` (DDP, 8-bit AdamW, batch 4 per rank) next to a one-process peer: every round ends
    with the same θ on both, and the two-rank peer's records count the samples of both of its ranks."""
    n = 3
    run = [*swarm_overrides, f"rounds.num_rounds={n}", "averaging.target_group_size=2"]
    with LocalSwarm(tmp_path, overrides=run) as swarm:
        swarm.start_bootstrap()
        multi = swarm.start_peer(0, overrides=["inner.batch_size=4"], extra_args=["--nproc", "2"], name="multi")
        single = swarm.start_peer(1, name="single")
        assert swarm.wait([multi, single], timeout=300) == [0, 0], [swarm.tail(p) for p in (multi, single)]
        log = swarm.tail(multi, 400)
    assert "rank 1: rank 0 said stop" in log
    a, b = _rounds(swarm, "multi"), _rounds(swarm, "single")
    assert set(range(n)) <= set(a) and set(range(n)) <= set(b), (a, b)
    for r in range(n):
        assert a[r]["theta"] == b[r]["theta"], r
        assert a[r]["group"] == b[r]["group"] == 2
        assert a[r]["samples"] == a[r]["steps"] * 4 * 2  # B per rank × 2 ranks
    sa, sb = swarm.summary("multi"), swarm.summary("single")
    assert sa["theta"] == sb["theta"] and sa["final_loss"] < sa["initial_loss"]
    assert 0.5 < sa["bytes_sent"] / sb["bytes_sent"] < 2.0  # one identity, one contribution


def _rank(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for p in launcher.children():
        try:
            if p.environ().get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in p.environ():
                return p
        except psutil.Error:
            continue
    return None


def test_a_dead_rank_ends_the_whole_peer_and_resume_restarts_it(tmp_path, swarm_overrides):
    """SIGKILL rank 1 of a two-rank peer mid-run: the peer ends within seconds with one line naming the
    rank, leaves no process behind (ranks, DHT, p2pd), keeps its last checkpoint, and `--resume` continues."""
    run = [*swarm_overrides, "rounds.num_rounds=0", "averaging.min_group_size=1", "checkpoint.every_rounds=1",
           "rounds.target_samples_per_round=48", "inner.batch_size=4", "averaging.matchmaking_time=1.0"]
    with LocalSwarm(tmp_path, overrides=run) as swarm:
        swarm.start_bootstrap()
        peer = swarm.start_peer(0, extra_args=["--nproc", "2"], name="multi")
        wait_until(lambda: "checkpoint " in swarm.tail(peer, 400) or not peer.alive(), 240,
                   lambda: f"a checkpoint: {swarm.tail(peer)}")
        launcher = psutil.Process(peer.popen.pid)
        tree = descendants(launcher.pid)
        victim = _rank(launcher, 1)
        assert victim is not None and len(tree) >= 4, tree  # two ranks, rank 0's DHT and p2pd at least
        t0 = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        assert swarm.wait([peer], timeout=60) == [1]
        took = time.monotonic() - t0
        wait_until(lambda: not alive(tree), 15, lambda: f"leftovers {alive(tree)}")
        log = swarm.tail(peer, 400)
        assert "error: rank 1 of this peer was killed by SIGKILL" in log, log[-3000:]
        assert took < 45, took
        from p2p_photon.state import load_latest

        ckpt = load_latest(tmp_path / "ckpt-multi")
        assert ckpt is not None and ckpt.meta["round"] >= 1
        again = swarm.start_peer(0, overrides=[f"checkpoint.dir={tmp_path / 'ckpt-multi'}"],
                                 extra_args=["--nproc", "2", "--resume"], name="resumed")
        wait_until(lambda: f"round {ckpt.meta['round']} |" in swarm.tail(again, 400) or not again.alive(), 240,
                   lambda: f"a round after the resume: {swarm.tail(again)}")
        assert f"resumed from {ckpt.path}" in swarm.tail(again, 400)
        swarm.signal(again, signal.SIGTERM)
        assert swarm.wait([again], timeout=90) == [0], swarm.tail(again)
    assert "rank 1: rank 0 said stop" in swarm.tail(again, 400)


# ----------------------------------------------------------------------------- the parts alone (no processes)


@pytest.mark.timeout(60)
def test_rank_slices_partition_the_peer_batch():
    """Rank k's rows of each N·B batch: disjoint, together the one-process batch, one shared cursor."""
    from p2p_photon.distributed import RankSlice

    class Stream:
        batch_size, pos = 6, 0

        def next_batch(self):
            self.pos += 1
            return torch.arange(6 * self.pos - 6, 6 * self.pos).view(6, 1)

        def state_dict(self):
            return {"position": self.pos}

    parts = [RankSlice(Stream(), k, 3) for k in range(3)]
    first = [s.next_batch().view(-1).tolist() for s in parts]
    assert first == [[0, 1], [2, 3], [4, 5]] and parts[1].state_dict() == {"position": 1}


@pytest.mark.timeout(60)
def test_what_a_multi_rank_peer_refuses_and_strip_nproc():
    from p2p_photon.config import load_config
    from p2p_photon.distributed import strip_nproc
    from p2p_photon.errors import UsageError
    from p2p_photon.peer.ranks import check_supported

    check_supported(load_config(None, []))
    check_supported(load_config(None, ["inner.parallel='fsdp2'", "inner.optimizer='adamw'"]))
    with pytest.raises(UsageError, match="block_cycle"):
        check_supported(load_config(None, ["outer.block_cycle=3"]))
    with pytest.raises(UsageError, match="DTensor"):
        check_supported(load_config(None, ["inner.parallel='fsdp2'"]))
    assert strip_nproc(["peer", "--nproc", "2", "--resume", "--nproc=4", "--set", "a=1"]) == \
        ["peer", "--resume", "--set", "a=1"]
