"""Issue 8: bad input, end to end — the rows of README's "Bad input" table that no other test covers.

Every case runs the real command line (`python -m p2p_photon.cli`, real processes, no mocks) and
checks: one `error:` line naming the problem and the fix (or a warning, and the run goes on), the
exit code, no traceback, and that the last good checkpoint still loads with its θ hash.

Two conditions are made real rather than imagined: a full disk is RLIMIT_FSIZE in the child (a
write past the limit fails with EFBIG, as ENOSPC would on a full disk), and a read-only directory
is chmod 500 with CAP_DAC_OVERRIDE dropped from the child's capability bounding set when the tests
run as root (root ignores file permissions otherwise).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from p2p_photon import state
from p2p_photon.config import load_config
from p2p_photon.hashing import theta_hash
from p2p_photon.launch import LocalSwarm
from p2p_photon.model import build_model
from tests.helpers import (
    PYTHON,
    SMALL_DATA,
    checkpoint_payload,
    free_port,
    python_env,
    random_peer_id,
    wait_until,
)

FULL_DISK_BYTES = 256 * 1024  # below θ of the nano test model (~760 KB), above logs and summaries
GOOD_ROUND = 3
RUN_ID = f"bad-{uuid.uuid4().hex[:8]}"  # part of the run fingerprint: the lone peers that resume share it


# ----------------------------------------------------------------------------- helpers


def _full_disk() -> None:
    """preexec_fn: files of this process tree cannot grow past FULL_DISK_BYTES (EFBIG, not SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FULL_DISK_BYTES, FULL_DISK_BYTES))


def _obey_permissions() -> None:
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE so that a chmod 500 directory is read-only to the child."""
    if os.geteuid() != 0:
        return
    pr_capbset_drop, cap_dac_override = 24, 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_capbset_drop, cap_dac_override, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


def _cmd(*args: str, sets: list[str] = ()) -> list[str]:
    cmd = [PYTHON, "-m", "p2p_photon.cli", *args]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def cli(*args: str, sets: list[str] = (), preexec: Callable[[], None] | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args, sets=sets), capture_output=True, text=True, env=python_env(),
                          preexec_fn=preexec, stdin=subprocess.DEVNULL, timeout=timeout)


def spawn(log: Path, *args: str, sets: list[str] = (),
          preexec: Callable[[], None] | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(_cmd(*args, sets=sets), stdout=out, stderr=subprocess.STDOUT,
                                env=python_env(), preexec_fn=preexec, stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for `proc`; kill it if it is still running then (its orphan reaper ends its DHT children)."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def one_error(stderr: str, code: int, returncode: int) -> str:
    """The single `error:` line of a failed command (exit `code`, no traceback)."""
    assert returncode == code, (returncode, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def lone_peer_sets(data_cache: Path, ckpt: Path, *extra: str) -> list[str]:
    """A nano peer on 127.0.0.1 with no initial peers (the first and only node of its own DHT)."""
    return [*SMALL_DATA, f"data.cache_dir={data_cache}", "model.seq_len=64", "inner.batch_size=8",
            "logging.progress_bar=false", "logging.eval_batches=2", "checkpoint.every_rounds=0",
            "dht.startup_timeout=60", f"dht.run_id={RUN_ID}", f"checkpoint.dir={ckpt}", *extra]


def checked_theta(ckpt_dir: Path) -> str:
    """θ hash of the newest loadable checkpoint, recomputed from its tensors in model order."""
    ck = state.load_latest(ckpt_dir)
    assert ck is not None, f"no checkpoint in {ckpt_dir}"
    names = [n for n, _ in build_model("nano", 64, 8, seed=0).named_parameters()]  # the order only
    assert theta_hash([ck.theta[n] for n in names]) == ck.meta["theta"]
    return ck.meta["theta"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, data_cache) -> Path:
    """A real peer's checkpoint, rewritten as round GOOD_ROUND (so that a resume is told from a fresh start):
    a lone peer is stopped with SIGTERM once it has joined and writes its final checkpoint."""
    root = tmp_path_factory.mktemp("good")
    ckpt = root / "ckpt"
    log = root / "peer.log"
    proc = spawn(log, "peer", sets=lone_peer_sets(data_cache, ckpt, "checkpoint.export_hf=true"))
    try:
        wait_until(lambda: "joined run" in log.read_text() or proc.poll() is not None, 180,
                   lambda: f"the lone peer to join its run:\n{log.read_text()[-3000:]}")
        proc.send_signal(signal.SIGTERM)
    finally:
        assert finish(proc, 120) == 0, log.read_text()[-3000:]
    first = ckpt / "ckpt-00000000"
    # checkpoint.export_hf: the final checkpoint's model is also there in Hugging Face format
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt / "hf", local_files_only=True)
    assert theta_hash(hf) == state.load_checkpoint(first).meta["theta"]
    shutil.rmtree(ckpt / "hf")
    payload = state.load_checkpoint(first)
    payload.meta["round"], payload.config = GOOD_ROUND, load_config(first / "config.toml")
    state.save_checkpoint(ckpt, payload)
    shutil.rmtree(first)
    checked_theta(ckpt)
    return ckpt


def copy_good(good_ckpt: Path, tmp_path: Path) -> tuple[Path, str]:
    ckpt = Path(shutil.copytree(good_ckpt, tmp_path / "ckpt"))
    return ckpt, checked_theta(ckpt)


# ----------------------------------------------------------------------------- addresses and network


@pytest.mark.timeout(60)
def test_initial_peer_without_a_peer_id_is_a_one_line_error(tmp_path):
    r = cli("peer", "--initial-peers", "/ip4/127.0.0.1/tcp/31337", sets=[f"checkpoint.dir={tmp_path}"])
    line = one_error(r.stderr, 1, r.returncode)
    assert "has no /p2p/<peer id> part" in line and "copy the full address the bootstrap node prints" in line


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_unreachable_bootstrap_retries_then_gives_up_with_a_clear_message(tmp_path, data_cache):
    bootstrap = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{random_peer_id()}"  # nobody listens there
    ckpt = tmp_path / "ckpt"
    sets = lone_peer_sets(data_cache, ckpt, "dht.bootstrap_timeout=5")
    r = cli("peer", "--initial-peers", bootstrap, sets=sets)
    line = one_error(r.stderr, 1, r.returncode)
    assert line == ("error: could not reach any of --initial-peers within 5s: check the address and that the "
                    "bootstrap node is running")
    assert "initial peers not reachable yet, retrying in" in r.stderr  # the retries are visible
    assert state.list_checkpoints(ckpt) == []  # a peer that never joined writes no checkpoint

    # a stop request during start-up is obeyed at once, not after the start-up's minutes of retries
    log = tmp_path / "peer.log"
    proc = spawn(log, "peer", "--initial-peers", bootstrap,
                 sets=lone_peer_sets(data_cache, ckpt, "dht.bootstrap_timeout=600"))
    try:
        wait_until(lambda: "retrying in" in log.read_text() or proc.poll() is not None, 120,
                   lambda: f"the peer to retry its initial peers:\n{log.read_text()[-3000:]}")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = finish(proc, 60)
    finally:
        finish(proc, 1)
    assert code == 0 and time.monotonic() - t0 < 30, (code, log.read_text()[-3000:])
    assert "received SIGTERM during start-up" in log.read_text() and "Traceback" not in log.read_text()
    assert state.list_checkpoints(ckpt) == []


@pytest.mark.parametrize("command", ["bootstrap", "peer"])
@pytest.mark.timeout(180)
def test_port_already_in_use_is_a_one_line_error(tmp_path, data_cache, command):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"/ip4/127.0.0.1/tcp/{busy.getsockname()[1]}"
        sets = lone_peer_sets(data_cache, tmp_path / "ckpt") if command == "peer" else []
        r = cli(command, "--host-maddrs", addr, sets=sets)
    line = one_error(r.stderr, 1, r.returncode)
    assert f"--host-maddrs: {addr} is already in use" in line and "use port 0" in line


# ----------------------------------------------------------------------------- config and data


@pytest.mark.parametrize("args,sets,needle", [
    (["peer", "--config", "{bad}"], [], "inner.lr: must be"),
    (["train", "--steps", "1"], ["inner.bogus=1"], "unknown key 'inner.bogus'"),
    (["bootstrap", "--config", "{missing}"], [], "not found"),
], ids=["peer-bad-value", "train-unknown-key", "bootstrap-missing-file"])
@pytest.mark.timeout(60)
def test_config_errors_stop_every_command_with_exit_2(tmp_path, args, sets, needle):
    """`config check` and every case are in test_config; here: each command stops at once with exit 2."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[inner]\nlr = 'fast'\n")
    r = cli(*[a.format(bad=bad, missing=tmp_path / "missing.toml") for a in args], sets=sets)
    assert needle in one_error(r.stderr, 2, r.returncode)


def _binary_file(d: Path) -> Path:
    (d / "model.bin").write_bytes(bytes(range(256)) * 64)
    return d / "model.bin"


@pytest.mark.parametrize("make,needle", [
    (lambda d: d, "no readable text"),
    (_binary_file, "1 binary/non-UTF-8"),
], ids=["empty", "binary"])
@pytest.mark.timeout(120)
def test_peer_with_an_empty_or_binary_corpus_is_a_one_line_error(tmp_path, make, needle):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    r = cli("peer", sets=[f"data.corpus={make(corpus)}", f"data.cache_dir={tmp_path / 'cache'}",
                          f"checkpoint.dir={tmp_path / 'ckpt'}", "logging.progress_bar=false"])
    line = one_error(r.stderr, 1, r.returncode)
    assert needle in line and "point data.corpus at UTF-8 text files" in line


# ----------------------------------------------------------------------------- damaged checkpoints


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_bytes(f: Path) -> None:
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    f.write_bytes(bytes(data))


@pytest.mark.swarm
@pytest.mark.parametrize("damage", [_truncate, _flip_bytes], ids=["truncated", "corrupt"])
@pytest.mark.timeout(240)
def test_resume_skips_a_damaged_checkpoint_with_a_warning_and_goes_on(tmp_path, data_cache, good_ckpt,
                                                                     damage):
    ckpt, theta = copy_good(good_ckpt, tmp_path)
    newest = Path(shutil.copytree(ckpt / f"ckpt-{GOOD_ROUND:08d}", ckpt / f"ckpt-{GOOD_ROUND + 1:08d}"))
    damage(newest / "theta.safetensors")
    summary = tmp_path / "summary.json"
    r = cli("peer", "--resume", "--summary-out", str(summary),
            sets=lone_peer_sets(data_cache, ckpt, f"rounds.num_rounds={GOOD_ROUND}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "error:" not in r.stderr
    assert (f"checkpoint file {newest / 'theta.safetensors'} is corrupt or truncated (sha256 mismatch); "
            "falling back to the previous checkpoint") in r.stderr
    assert f"resumed from {ckpt / f'ckpt-{GOOD_ROUND:08d}'}: round {GOOD_ROUND}" in r.stderr
    assert checked_theta(ckpt) == theta  # the final checkpoint (same round, same θ) replaced it
    assert json.loads(summary.read_text())["theta"] == theta


@pytest.mark.timeout(180)
def test_resume_with_no_usable_checkpoint_is_a_one_line_error(tmp_path, data_cache, good_ckpt):
    ckpt, _ = copy_good(good_ckpt, tmp_path)
    _flip_bytes(ckpt / f"ckpt-{GOOD_ROUND:08d}" / "theta.safetensors")
    before = snapshot(ckpt)
    r = cli("peer", "--resume", sets=lone_peer_sets(data_cache, ckpt))
    line = one_error(r.stderr, 1, r.returncode)
    assert f"no usable checkpoint in {ckpt}: checkpoint file" in line and "is corrupt or truncated" in line
    assert "move the damaged checkpoints away (or run without --resume) to start fresh" in line
    assert snapshot(ckpt) == before


@pytest.mark.timeout(180)
def test_resume_with_another_run_fingerprint_is_refused_with_exit_2(tmp_path, data_cache, good_ckpt):
    ckpt, theta = copy_good(good_ckpt, tmp_path)
    before = snapshot(ckpt)
    r = cli("peer", "--resume", sets=lone_peer_sets(data_cache, ckpt, "outer.preset='diloco'"))
    line = one_error(r.stderr, 2, r.returncode)
    assert f"checkpoint {ckpt / f'ckpt-{GOOD_ROUND:08d}'} belongs to run fingerprint" in line
    assert "use the config it was written with, or another checkpoint.dir" in line
    assert snapshot(ckpt) == before and checked_theta(ckpt) == theta


# ----------------------------------------------------------------------------- read-only directory


@pytest.mark.timeout(120)
def test_read_only_checkpoint_dir_fails_at_start_before_any_training(tmp_path, data_cache, good_ckpt):
    ckpt, theta = copy_good(good_ckpt, tmp_path)
    before = snapshot(ckpt)
    ckpt.chmod(0o500)
    try:
        r = cli("peer", "--resume", sets=lone_peer_sets(data_cache, ckpt), preexec=_obey_permissions)
        line = one_error(r.stderr, 1, r.returncode)
        assert line == (f"error: checkpoint.dir {ckpt} is not writable (Permission denied): fix its "
                        "permissions or point checkpoint.dir at a writable directory")
        assert "preparing data" not in r.stderr and "DHT started" not in r.stderr  # before any work
        # the centralized baseline checks its --save directory the same way, before training
        r = cli("train", "--steps", "1", "--save", str(ckpt / "hf"), sets=[f"data.cache_dir={data_cache}"],
                preexec=_obey_permissions)
        assert "--save" in one_error(r.stderr, 1, r.returncode)
        assert "is not writable (Permission denied)" in r.stderr
    finally:
        ckpt.chmod(0o755)
    assert snapshot(ckpt) == before and checked_theta(ckpt) == theta


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_checkpoint_dir_turning_read_only_mid_run_fails_the_final_save_only(tmp_path, data_cache, good_ckpt):
    ckpt, theta = copy_good(good_ckpt, tmp_path)
    log = tmp_path / "peer.log"
    proc = spawn(log, "peer", "--resume", sets=lone_peer_sets(data_cache, ckpt), preexec=_obey_permissions)
    try:
        wait_until(lambda: "joined run" in log.read_text() or proc.poll() is not None, 180,
                   lambda: f"the peer to join its run:\n{log.read_text()[-3000:]}")
        assert proc.poll() is None, log.read_text()[-3000:]
        ckpt.chmod(0o500)
        proc.send_signal(signal.SIGTERM)
    finally:
        code = finish(proc, 120)
        ckpt.chmod(0o755)
    line = one_error(log.read_text(), 1, code)
    assert line == (f"error: could not write a checkpoint in {ckpt}: Permission denied; make it writable, or "
                    "point checkpoint.dir at a writable directory (earlier checkpoints are untouched)")
    assert [p.name for p in state.list_checkpoints(ckpt)] == [f"ckpt-{GOOD_ROUND:08d}"]
    assert checked_theta(ckpt) == theta and leftovers(ckpt) == []


# ----------------------------------------------------------------------------- full disk


@pytest.mark.timeout(120)
def test_full_disk_during_a_checkpoint_write_keeps_the_last_good_one(tmp_path):
    good = checkpoint_payload(1)
    state.save_checkpoint(tmp_path, good)
    names = list(good.theta)
    code = ("import sys\n"
            "from p2p_photon import state\n"
            "from tests.helpers import checkpoint_payload\n"
            "for r in (2, 1):  # a new round, then the same round again (the replace path)\n"
            "    try:\n"
            "        state.save_checkpoint(sys.argv[1], checkpoint_payload(r))\n"
            "        print('saved', r)\n"
            "    except state.CheckpointError as e:\n"
            "        print(e)\n")
    r = subprocess.run([PYTHON, "-c", code, str(tmp_path)], capture_output=True, text=True, env=python_env(),
                       preexec_fn=_full_disk, timeout=100)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    expected = (f"could not write a checkpoint in {tmp_path}: File too large; free some space, or point "
                "checkpoint.dir at a disk with room (earlier checkpoints are untouched)")
    assert r.stdout.splitlines() == [expected, expected]
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["ckpt-00000001"]
    assert leftovers(tmp_path) == []  # the partial copies were removed
    back = state.load_latest(tmp_path, "fp")
    assert theta_hash([back.theta[n] for n in names]) == good.meta["theta"]


def test_write_errors_name_the_fix():
    root = Path("/ckpt")
    full = state._write_error(root, OSError(errno.ENOSPC, "No space left on device"))
    assert full == ("could not write a checkpoint in /ckpt: No space left on device; free some space, or "
                    "point checkpoint.dir at a disk with room (earlier checkpoints are untouched)")
    assert "make it writable" in state._write_error(root, OSError(errno.EROFS, "Read-only file system"))


@pytest.mark.timeout(60)
def test_partial_copies_of_a_dead_writer_are_cleaned_up(tmp_path):
    state.save_checkpoint(tmp_path, checkpoint_payload(1))
    dead = subprocess.Popen(["true"])
    dead.wait()
    partial = tmp_path / f".tmp-ckpt-00000002-{dead.pid}"
    partial.mkdir()
    (partial / "theta.safetensors").write_bytes(b"\0" * 1000)
    os.rename(tmp_path / "ckpt-00000001", tmp_path / f".old-ckpt-00000001-{dead.pid}")  # died mid-replace
    state.save_checkpoint(tmp_path, checkpoint_payload(3))
    assert [p.name for p in state.list_checkpoints(tmp_path)] == ["ckpt-00000003", "ckpt-00000001"]
    assert leftovers(tmp_path) == []
    assert state.load_checkpoint(tmp_path / "ckpt-00000001").meta["round"] == 1


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_full_disk_at_the_final_checkpoint_exits_1_and_keeps_the_last_good_one(tmp_path, data_cache,
                                                                               good_ckpt):
    ckpt, theta = copy_good(good_ckpt, tmp_path)
    r = cli("peer", "--resume", sets=lone_peer_sets(data_cache, ckpt, f"rounds.num_rounds={GOOD_ROUND}"),
            preexec=_full_disk)
    line = one_error(r.stderr, 1, r.returncode)
    assert line == (f"error: could not write a checkpoint in {ckpt}: File too large; free some space, or "
                    "point checkpoint.dir at a disk with room (earlier checkpoints are untouched)")
    assert [p.name for p in state.list_checkpoints(ckpt)] == [f"ckpt-{GOOD_ROUND:08d}"]
    assert checked_theta(ckpt) == theta and leftovers(ckpt) == []


@pytest.mark.swarm
@pytest.mark.timeout(400)
def test_full_disk_mid_run_is_a_warning_and_the_peer_keeps_training(tmp_path, swarm_overrides, good_ckpt):
    """Periodic checkpoints that cannot be written are warnings: the peer keeps averaging with the
    swarm; only its final checkpoint failing makes it exit 1. Its last good checkpoint is untouched."""
    ckpt, theta = copy_good(good_ckpt, tmp_path)
    run = [*swarm_overrides, "rounds.num_rounds=2"]
    with LocalSwarm(tmp_path / "swarm", overrides=run) as swarm:
        swarm.start_bootstrap()
        healthy = swarm.start_peer(0)
        log, summary = tmp_path / "full.log", tmp_path / "full.summary.json"
        full = spawn(log, "peer", "--initial-peers", *swarm.maddrs, "--summary-out", str(summary),
                     sets=[*run, "data.silo=1", f"checkpoint.dir={ckpt}", "checkpoint.every_rounds=1"],
                     preexec=_full_disk)
        code = finish(full, 300)
        assert swarm.wait([healthy], timeout=120) == [0], swarm.tail(healthy)
    text = log.read_text()
    line = one_error(text, 1, code)
    assert "could not write a checkpoint" in line and "File too large; free some space" in line
    assert text.count("(earlier checkpoints are untouched); training goes on") == 2
    for r in (1, 2):
        failed = f"checkpoint of round {r} failed: could not write a checkpoint in {ckpt}: File too large"
        assert failed in text
    done = json.loads(summary.read_text())
    assert done["rounds"] == 2 and done["theta"] == swarm.summary("peer0")["theta"]  # it took part throughout
    assert [p.name for p in state.list_checkpoints(ckpt)] == [f"ckpt-{GOOD_ROUND:08d}"]
    assert checked_theta(ckpt) == theta and leftovers(ckpt) == []


# ----------------------------------------------------------------------------- bring your own data (issue 14)


RUN_SETS = ["model.seq_len=32", "data.vocab_size=512", "data.max_corpus_mb=0.3", "inner.batch_size=4"]


def _texts(root: Path, n: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"m{i}.py").write_text("".join(f"def f_{i}_{k}(x):\n    return x + {k}\n\n" for k in range(30)))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byod")
    r = cli("run", "new", "--train-tokenizer-on", str(_texts(root / "public")), "-o", str(root / "run"),
            sets=RUN_SETS)
    assert r.returncode == 0 and "written to" in r.stdout, r.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def hosted(run_dir, tmp_path_factory):
    """A bootstrap hosting run_dir: (its maddrs, the run id)."""
    root = tmp_path_factory.mktemp("host")
    proc = spawn(root / "boot.log", "bootstrap", "--run", str(run_dir), "--maddrs-file", str(root / "b.json"))
    try:
        wait_until(lambda: (root / "b.json").exists() or proc.poll() is not None, 120,
                   lambda: (root / "boot.log").read_text()[-3000:])
        info = json.loads((root / "b.json").read_text())
        yield info["maddrs"], info["run_id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        finish(proc, 60)


@pytest.mark.timeout(240)
def test_run_new_with_a_file_that_is_not_a_tokenizer_is_a_one_line_error(tmp_path):
    (tmp_path / "tok.json").write_text('{"model": "nope"}')
    r = cli("run", "new", "--tokenizer", str(tmp_path / "tok.json"), "--eval", str(_texts(tmp_path / "ev", 2)),
            "-o", str(tmp_path / "run"), sets=RUN_SETS)
    assert "is not a tokenizer file" in one_error(r.stderr, 1, r.returncode)
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []


@pytest.mark.timeout(240)
def test_bootstrap_of_a_run_whose_files_do_not_match_its_spec_is_refused(run_dir, tmp_path):
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace("<|endoftext|>", "<|eot|>"))
    r = cli("bootstrap", "--run", str(copy))
    assert "tokenizer.json does not match the spec's sha256" in one_error(r.stderr, 1, r.returncode)


@pytest.mark.parametrize("name,content", [("corpus.zip", b"PK\x03\x04" + bytes(100)), ("blob", bytes(range(256)))])
@pytest.mark.timeout(240)
def test_peer_with_a_corpus_of_unknown_format_fails_before_the_network(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    r = cli("peer", "--initial-peers", f"/ip4/127.0.0.1/tcp/9/p2p/{random_peer_id()}", "--data",
            str(tmp_path / name), sets=[f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.dir={tmp_path / 'ck'}"])
    line = one_error(r.stderr, 1, r.returncode)
    assert "unknown corpus format" in line and ".jsonl.zst" in line and not (tmp_path / "cache").exists()


def _join(hosted, tmp_path: Path, data: Path, *args: str, sets: list[str] = ()) -> subprocess.CompletedProcess:
    maddrs, _ = hosted
    return cli("peer", "--initial-peers", *maddrs, "--data", str(data), "--spec-timeout", "5", *args,
               sets=[f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.dir={tmp_path / 'ck'}",
                     "logging.progress_bar=false", *sets])


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_joining_an_unknown_run_id_is_a_one_line_error(hosted, tmp_path):
    r = _join(hosted, tmp_path, _texts(tmp_path / "mine", 2), "--run-id", "0123456789abcdef")
    line = one_error(r.stderr, 1, r.returncode)
    assert "unknown run id 0123456789abcdef" in line and hosted[1] in line
    assert not (tmp_path / "cache" / "runs" / "0123456789abcdef").exists()


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_a_corpus_too_small_for_one_batch_is_a_one_line_error(hosted, tmp_path):
    (tmp_path / "tiny.txt").write_text("x = 1\n")
    r = _join(hosted, tmp_path, tmp_path / "tiny.txt")
    line = one_error(r.stderr, 1, r.returncode)
    assert "is too small" in line and "one batch needs inner.batch_size x (model.seq_len+1) = 264" in line
    private = tmp_path / "cache" / "private"
    assert [p.name for p in private.iterdir() if p.name.startswith(".partial")] == []


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_a_parquet_corpus_without_the_text_column_is_a_one_line_error(hosted, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["some text"] * 10}), tmp_path / "c.parquet")
    r = _join(hosted, tmp_path, tmp_path / "c.parquet")
    line = one_error(r.stderr, 1, r.returncode)
    assert "has no column 'text' (columns: body)" in line and "--text-field" in line
    assert [p.name for p in (tmp_path / "cache" / "private").iterdir() if not p.name.startswith(".lock")] == []


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_overriding_a_run_wide_key_is_a_one_line_error_with_exit_2(hosted, tmp_path):
    r = _join(hosted, tmp_path, _texts(tmp_path / "mine", 2), sets=["model.seq_len=64"])
    line = one_error(r.stderr, 2, r.returncode)
    assert "model.seq_len is run-wide" in line and "run-wide keys: seed, model.preset" in line
