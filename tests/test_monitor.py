"""Issue 5: the monitor watches a real swarm, counts hostile records, logs JSONL and plots it.

The swarm model (p2p_photon.monitor.state) is pure and tested against hand-computed values.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import time
import urllib.request

import pytest
from PIL import Image

from p2p_photon import cli
from p2p_photon.monitor import (
    MonitorError,
    MonitorOptions,
    peer_table,
    plot_log,
    read_log,
    summary_line,
)
from p2p_photon.monitor.state import Swarm, majority, peer_row, round_eta, run_setting, swarm_summary
from tests.helpers import PYTHON, REPO_ROOT, free_port, python_env, wait_until

RECORD_FIELDS = {"peer_id", "round", "samples", "steps", "total_samples", "loss", "tokens_per_s",
                 "fingerprint", "theta_hash", "failed_rounds", "bytes_sent", "bytes_received", "utilization",
                 "time", "state", "target_samples", "seq_len"}


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _run_id(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("dht.run_id="))


# ----------------------------------------------------------------------------- a real swarm


@pytest.mark.swarm
@pytest.mark.timeout(180)
def test_monitor_reports_two_training_peers_with_rising_rounds(tmp_path, swarm_overrides):
    from p2p_photon.config import DHTConfig
    from p2p_photon.launch import LocalSwarm
    from p2p_photon.monitor import Monitor, serve_dashboard

    run_id, log = _run_id(swarm_overrides), tmp_path / "monitor.jsonl"
    run = [*swarm_overrides, "rounds.num_rounds=0", "logging.eval_every_rounds=1"]
    with LocalSwarm(tmp_path / "swarm", overrides=run) as swarm:
        maddrs = swarm.start_bootstrap()
        peers = [swarm.start_peer(i) for i in range(2)]
        opts = MonitorOptions(run_id=run_id, interval=1.0, log_path=str(log))
        with Monitor(opts, dht_cfg=DHTConfig(run_id=run_id, initial_peers=tuple(maddrs))) as monitor:
            monitor.start(reaper=False)
            dashboard = serve_dashboard(monitor, f"127.0.0.1:{free_port()}")
            try:
                monitor.start_background()
                first, last = _watch_rounds(dashboard.url, swarm, peers)
            finally:
                dashboard.stop()
    assert set(first) == set(last) and len(last) == 2, (first, last)
    assert all(last[p] >= 2 and last[p] > first[p] for p in last), (first, last)
    _check_log(log, set(last))


def _watch_rounds(url: str, swarm, peers) -> tuple[dict[str, int], dict[str, int]]:
    """Poll /api/state until two peers show up, then until both reach round 2; (first, last) rounds."""
    first: dict[str, int] = {}
    last: dict[str, int] = {}

    def seen(min_round: int) -> bool:
        assert all(p.alive() for p in peers), [swarm.tail(p) for p in peers]
        state = _get_json(url + "api/state")
        assert state["invalid_records"] == 0 and state["poll_errors"] == 0, state
        for row in state["peers"]:
            first.setdefault(row["peer_id"], row["round"])
            last[row["peer_id"]] = row["round"]
        alive = [r for r in state["peers"] if r["alive"]]
        if min_round >= 2:  # peers evaluate every round: the swarm line carries the held-out perplexity
            ppl = state["swarm"]["eval_ppl"]
            assert ppl is None or (1.0 < ppl < 5000 and "held-out ppl" in state["summary"]), state["swarm"]
            if ppl is None or state["swarm"]["eval_round"] < 1:
                return False
        return len(alive) == 2 and all(r["round"] >= min_round for r in alive)

    assert wait_until(lambda: seen(0), timeout=90, interval=1.0), [swarm.tail(p) for p in peers]
    ok = wait_until(lambda: seen(2), timeout=100, interval=1.0)
    assert ok, (first, last, [swarm.tail(p) for p in peers])
    return first, last


def _check_log(log, peer_ids: set[str]) -> None:
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["peer_id"] for r in lines} == peer_ids
    assert all(RECORD_FIELDS | {"observed_at"} <= set(r) for r in lines)
    keys = [(r["peer_id"], r["time"]) for r in lines]
    assert len(keys) == len(set(keys)), "the log repeats an observation"
    for pid in peer_ids:
        rounds = [r["round"] for r in lines if r["peer_id"] == pid]
        assert max(rounds) >= 2 and rounds == sorted(rounds), rounds


# ------------------------------------------------------------------------ hostile records (in-process DHTs)

HOSTILE_RUN = "monitor-hostile"


@pytest.fixture(scope="module")
def hostile_dht():
    """An honest node with one valid record, and a rogue node holding a signed NaN-loss record of its own.

    Honest nodes refuse the rogue record (schema validator); the rogue's node keeps and serves it.
    Yields (maddrs to join, the honest peer ID).
    """
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.utils.crypto import RSAPrivateKey

    from p2p_photon.config import DHTConfig
    from p2p_photon.network import shutdown_dht, start_dht, visible_maddrs
    from p2p_photon.progress import ProgressPublisher, ProgressRecord, progress_key, progress_validators
    from tests.helpers import make_record, no_leaked_p2pd

    local = ("/ip4/127.0.0.1/tcp/0",)
    honest_v = progress_validators(HOSTILE_RUN, RSAPrivateKey())
    rogue_v = [RSASignatureValidator(RSAPrivateKey())]
    with no_leaked_p2pd(timeout=15):
        honest = start_dht(DHTConfig(run_id=HOSTILE_RUN, host_maddrs=local), record_validators=honest_v,
                           reaper=False)
        rogue = None
        try:
            maddrs = tuple(visible_maddrs(honest))
            rogue = start_dht(DHTConfig(run_id=HOSTILE_RUN, host_maddrs=local, initial_peers=maddrs),
                              record_validators=rogue_v, reaper=False)
            honest_id = honest.peer_id.to_base58()
            record = ProgressRecord(**make_record(honest_id, time=time.time() + 600))  # outlives the module
            assert ProgressPublisher(honest, HOSTILE_RUN, honest_v, expiration=900).publish(record)
            rogue.store(progress_key(HOSTILE_RUN), make_record("rogue", loss=math.nan, samples=-3),
                        expiration_time=time.time() + 900, subkey=rogue_v[0].local_public_key)
            yield maddrs, honest_id
        finally:
            shutdown_dht(rogue)
            shutdown_dht(honest)


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_hostile_records_are_skipped_counted_and_do_not_stop_the_monitor(hostile_dht, tmp_path):
    from p2p_photon.config import DHTConfig
    from p2p_photon.monitor import Monitor

    maddrs, honest_id = hostile_dht
    opts = MonitorOptions(run_id=HOSTILE_RUN, interval=0.3, log_path=str(tmp_path / "m.jsonl"))
    with Monitor(opts, dht_cfg=DHTConfig(run_id=HOSTILE_RUN, initial_peers=maddrs)) as monitor:
        monitor.start(reaper=False).start_background()
        ok = wait_until(lambda: monitor.state()["invalid_records"] >= 1 and monitor.state()["peers"], 30)
        state = monitor.state()
        assert ok, state
        assert [r["peer_id"] for r in state["peers"]] == [honest_id] and state["poll_errors"] == 0
        polls = state["polls"]
        assert wait_until(lambda: monitor.state()["polls"] >= polls + 3, 15), "the monitor stopped polling"
        assert monitor.polling and monitor.state()["swarm"]["invalid_records"] >= 1
    logged = [json.loads(line)["peer_id"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert logged == [honest_id], "one observation of the honest peer, none of the rogue"


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_monitor_command_runs_for_its_duration_with_log_and_dashboard(hostile_dht, tmp_path, capsys):
    """`cmd_monitor` end to end (in process, through cli's parser), then SIGINT-free exit."""
    maddrs, honest_id = hostile_dht
    (tmp_path / "boot.json").write_text(json.dumps({"maddrs": list(maddrs)}))
    args = cli.build_parser().parse_args([
        "monitor", "--initial-peers-file", str(tmp_path / "boot.json"), "--run-id", HOSTILE_RUN,
        "--log", str(tmp_path / "cli.jsonl"), "--http", f"127.0.0.1:{free_port()}",
        "--interval", "0.5", "--duration", "4", "--no-live"])
    assert args.func is cli.cmd_monitor and args.func(args) == 0
    out = capsys.readouterr().out
    assert "dashboard: http://127.0.0.1:" in out
    assert "peers 1/1" in out and "invalid 1" in out, out
    assert "samples 64/?" in out, "make_record's peer says no target: it must show as unknown"
    logged = (tmp_path / "cli.jsonl").read_text().splitlines()
    assert [json.loads(line)["peer_id"] for line in logged] == [honest_id]


# ----------------------------------------------------------------------------- swarm model (pure)


def _row(pid: str, **kw) -> dict:
    row = dict(peer_id=pid, peer=pid[-8:], alive=True, round=3, samples=40, tokens_per_s=640.0,
               fingerprint="fp", theta_hash="h1", theta_round=3, target_samples=96, seq_len=64)
    row.update(kw)
    return row


def _record(pid: str, **kw):
    from p2p_photon.progress import ProgressRecord
    from tests.helpers import make_record

    return ProgressRecord(**make_record(pid, **kw))


@pytest.mark.timeout(10)
def test_swarm_line_uses_the_majority_fingerprint_and_the_global_round():
    rows = [_row("a"), _row("b", samples=24), _row("c", round=2, theta_round=2, theta_hash="h0"),
            _row("x", fingerprint="other", round=9), _row("g", alive=False, round=7)]
    s = swarm_summary(rows)
    assert (s["round"], s["samples"], s["alive_peers"], s["known_peers"]) == (3, 64, 4, 5)
    assert (s["target_samples"], s["seq_len"]) == (96, 64)
    assert s["other_fingerprint_peers"] == 1 and s["theta_same"] is True
    assert s["eta_s"] == pytest.approx((96 - 64) / (2 * 640 / 64))  # 32 samples at 20 samples/s: 1.6 s
    assert s["tokens_per_s"] == pytest.approx(4 * 640.0)
    assert (s["theta_round"], s["distinct_theta"]) == (3, 1)
    s = swarm_summary([*rows, _row("d", theta_hash="h2")])
    assert s["theta_same"] is False and s["theta_hashes"] == ["h1", "h2"] and s["distinct_theta"] == 2
    # an overlapped peer trains round 4 while it holds θ of round 3: its hash is compared with round 3's
    s = swarm_summary([*rows, _row("o", round=4, theta_round=3, theta_hash="h1")])
    assert s["round"] == 4 and s["theta_same"] is True
    s = swarm_summary([])
    empty = (s["round"], s["eta_s"], s["theta_same"], s["alive_peers"], s["target_samples"])
    assert empty == (None, None, None, 0, None)


@pytest.mark.timeout(10)
def test_round_target_and_seq_len_are_read_from_the_records_ignoring_zero():
    # 0 means "did not say": two peers say 96, one 128, one nothing -> 96
    rows = [_row("a"), _row("b"), _row("c", target_samples=128), _row("d", target_samples=0, seq_len=0)]
    assert (swarm_summary(rows)["target_samples"], swarm_summary(rows)["seq_len"]) == (96, 64)
    assert run_setting([0, 128, 96]) == 96, "a tie goes to the smallest value, the same on every monitor"
    assert run_setting([True, -5, "96", 64.0, 0, 32]) == 32, "only positive ints count"
    assert run_setting([0, 0]) is None and majority([]) is None
    # peers of another fingerprint (a minority) cannot set the majority's target
    assert swarm_summary([_row("a", target_samples=0), _row("b", target_samples=0),
                          _row("x", fingerprint="zz", target_samples=999)])["target_samples"] is None


@pytest.mark.timeout(10)
def test_unknown_target_or_seq_len_shows_as_unknown_not_as_a_default():
    rows = [_row("a", target_samples=0), _row("b", samples=24, target_samples=0)]
    s = swarm_summary(rows)
    assert (s["target_samples"], s["eta_s"], s["samples"]) == (None, None, 64)
    line = summary_line(dict(swarm=dict(s, invalid_records=0)))
    assert line == "round 3 | samples 64/? | eta - | peers 2/2 | tok/s 1,280 | θ same | invalid 0"
    assert swarm_summary([_row("a", seq_len=0)])["eta_s"] is None, "no seq_len: samples/s is unknown"


@pytest.mark.timeout(10)
def test_round_eta_by_hand():
    current = [dict(tokens_per_s=640.0, samples=40), dict(tokens_per_s=1280.0, samples=8)]
    assert round_eta(current, 96, 64) == pytest.approx((96 - 48) / (1920 / 64))  # 48 left at 30/s: 1.6 s
    assert round_eta(current, 32, 64) == 0.0, "past the target: the round ends now"
    assert round_eta([dict(tokens_per_s=0.0, samples=8)], 96, 64) is None, "nobody is training"
    assert round_eta([], 96, 64) is None and round_eta(current, None, 64) is None


@pytest.mark.timeout(60)
def test_swarm_keeps_each_peers_newest_record_and_dates_it_by_the_earlier_clock():
    swarm = Swarm()
    old, future = _record("p1", time=100.0), _record("p2", time=205.0)
    assert swarm.observe([old, future], now=200.0) == [old, future]
    assert swarm.peers["p2"].seen_at == 200.0, "a record stamped in the future counts from when it was seen"
    assert swarm.observe([old, future], now=201.0) == [], "the same (peer, time) twice is one observation"
    newer = _record("p1", time=150.0, round=4)
    assert swarm.observe([newer, old], now=210.0) == [newer]
    p1, p2 = swarm.peers["p1"], swarm.peers["p2"]
    assert (p1.record.round, p1.observations, p2.observations) == (4, 2, 1)
    rows = swarm.rows(now=185.0, gone_after=30.0)  # p1 last seen 35 s ago, p2 0 s
    assert [(r["peer_id"], r["alive"], r["state"], r["last_seen_s"]) for r in rows] == [
        ("p2", True, "training", 0.0), ("p1", False, "gone", 35.0)]
    swarm.observe([_record("p2", time=206.0, state="done")], now=206.0)
    row = peer_row(swarm.peers["p2"], now=206.0, gone_after=30.0)
    assert (row["alive"], row["gone"], row["state"]) == (False, False, "done")


@pytest.mark.timeout(10)
def test_terminal_table_and_summary_line_render_every_peer():
    from rich.console import Console

    rows = [_row("12D3KooWaaaaBBBB1111", loss=3.2, steps=5, last_seen_s=1.0, failed_rounds=0,
                 bytes_sent=2_500_000, state="training", eval_ppl=812.37),
            _row("12D3KooWccccDDDD2222", alive=False, loss=0.0, steps=0, last_seen_s=45.0, failed_rounds=1,
                 bytes_sent=0, state="gone", eval_ppl=None)]
    state = dict(run_id="r", peers=rows, swarm=dict(swarm_summary(rows), invalid_records=2))
    console = Console(width=140, record=True, file=io.StringIO())
    console.print(peer_table(state))
    text = console.export_text()
    assert "aBBBB1111"[-8:] in text and "DDDD2222" in text and "2.5MB" in text and "45s ago" in text
    assert "ppl" in text and "812" in text
    expected = "round 3 | samples 40/96 | eta 6s | peers 1/2 | tok/s 640 | θ same | invalid 2"
    assert summary_line(state) == expected


@pytest.mark.timeout(10)
def test_bad_options_are_one_line_errors():
    for kw in (dict(run_id=""), dict(run_id="r", interval=0), dict(run_id="r", gone_after=math.nan)):
        with pytest.raises(MonitorError):
            MonitorOptions(**kw)


@pytest.mark.timeout(10)
def test_the_monitor_takes_no_run_constants_on_its_command_line(capsys):
    """The round target and seq_len come from the records: the old flags are refused, not ignored."""
    parser = cli.build_parser()
    base = ["monitor", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--run-id", "r"]
    for flag in ("--target-samples", "--seq-len"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, f"{flag}=96"])
        assert f"unrecognized arguments: {flag}=96" in capsys.readouterr().err


# ----------------------------------------------------------------------------- plots


def write_log(path, peers: int = 3, rounds: int = 4, per_round: int = 5, t0: float = 1.7e9,
              seq_len: object = 64) -> int:
    """A synthetic monitor log: loss falls, rounds advance, one peer leaves halfway."""
    lines = []
    for step in range(rounds * per_round):
        for p in range(peers):
            if p == peers - 1 and step > rounds * per_round // 2:
                continue
            now = t0 + 2.0 * step
            rnd = step // per_round
            lines.append(dict(peer_id=f"12D3KooWpeer{p:04d}xyz", round=rnd, samples=8 * (step % per_round),
                              steps=step, total_samples=8 * peers * step, loss=6.0 - 0.2 * step + 0.1 * p,
                              tokens_per_s=1000.0 + 100 * p, fingerprint="fp", theta_hash=f"h{rnd}",
                              failed_rounds=0, bytes_sent=1000 * rnd, bytes_received=1000 * rnd,
                              utilization=0.9, time=now - 0.5, state="training", observed_at=now,
                              target_samples=96, seq_len=seq_len))
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


def _assert_png(path, size=(1200, 400)) -> None:
    assert path.is_file() and path.stat().st_size > 10_000
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == size
        assert len(img.convert("RGB").getcolors(1 << 20) or []) > 20, "the image looks blank"


@pytest.mark.timeout(60)
def test_plot_turns_a_log_into_a_png_of_the_expected_size(tmp_path):
    log = tmp_path / "swarm.jsonl"
    n = write_log(log)
    with log.open("a") as f:
        f.write('{"peer_id": "broken"\n[1, 2]\n'
                '{"peer_id": "p", "loss": NaN, "observed_at": 1, "tokens_per_s": 1}\n')
    out, count, bad = plot_log(log, tmp_path / "out" / "swarm.png")
    assert (count, bad) == (n, 3)
    _assert_png(out)


@pytest.mark.timeout(60)
def test_plot_without_a_known_seq_len_draws_loss_against_samples(tmp_path):
    """Records that do not say their seq_len (0), or junk there, still plot, with no invented default."""
    for i, seq_len in enumerate((0, "64", None)):
        write_log(tmp_path / f"{i}.jsonl", seq_len=seq_len)
        out, count, bad = plot_log(tmp_path / f"{i}.jsonl", tmp_path / f"{i}.png")
        assert bad == 0
        _assert_png(out)


@pytest.mark.timeout(60)
def test_plot_errors_are_one_line(tmp_path):
    cases = {"missing.jsonl": None, "empty.jsonl": "", "corrupt.jsonl": "not json\n{]\n"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(MonitorError) as e:
            read_log(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


@pytest.mark.timeout(60)
def test_plot_subcommand_parses_and_runs(tmp_path, capsys):
    """`monitor plot` through cli's parser (in process)."""
    parser = cli.build_parser()
    write_log(tmp_path / "a.jsonl")
    args = parser.parse_args(["monitor", "plot", str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "a.png")])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    _assert_png(tmp_path / "a.png")
    args = parser.parse_args(["monitor", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--no-live"])
    with pytest.raises(MonitorError, match="--run-id"):
        args.func(args)


@pytest.mark.timeout(120)
def test_cli_monitor_plot_writes_a_png_and_reports_errors_in_one_line(tmp_path):
    write_log(tmp_path / "a.jsonl")
    cmd = [PYTHON, "-m", "p2p_photon.cli", "monitor", "plot", str(tmp_path / "a.jsonl"),
           "-o", str(tmp_path / "a.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=100, cwd=REPO_ROOT, env=python_env())
    assert done.returncode == 0, done.stderr
    _assert_png(tmp_path / "a.png")
    cmd[5] = str(tmp_path / "missing.jsonl")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=100, cwd=REPO_ROOT, env=python_env())
    assert done.returncode == 1 and "Traceback" not in done.stderr
    err = done.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, done.stderr


@pytest.mark.timeout(60)
def test_bans_show_who_by_whom_and_why():
    from p2p_photon.progress import MAX_BANS, ProgressRecord, ban_entries
    from tests.helpers import make_record

    banned = {f"12D3KooWattacker{i}": "sent non-finite values" for i in range(MAX_BANS + 3)}
    entries = ban_entries(banned)
    assert len(entries) == MAX_BANS and entries[-1] == f"12D3KooWattacker{MAX_BANS + 2}: sent non-finite values"
    rec = ProgressRecord(**make_record("12D3KooWhonest01", bans=entries[-1:]))  # the record carries them
    rows = [_row("honest01", bans=rec.bans), _row("honest02")]
    s = swarm_summary(rows)
    assert s["bans"] == [dict(who=f"12D3KooWattacker{MAX_BANS + 2}"[-8:], by="honest01", why="sent non-finite values")]
    line = summary_line(dict(run_id="r", peers=rows, swarm=dict(s, invalid_records=0)))
    assert "bans 1" in line and "BANNED" in line and "by honest01: sent non-finite values" in line
    assert "bans" not in summary_line(dict(run_id="r", peers=rows[1:], swarm=dict(swarm_summary(rows[1:]),
                                                                                  invalid_records=0)))


@pytest.mark.timeout(10)
def test_the_swarm_line_shows_the_median_held_out_perplexity_of_the_newest_evaluated_round():
    import math

    from p2p_photon.monitor.state import peer_row
    from p2p_photon.monitor.view import heldout_text

    rows = [_row("a", eval_loss=math.log(900.0), eval_round=4), _row("b", eval_loss=math.log(700.0), eval_round=5),
            _row("c", eval_loss=math.log(500.0), eval_round=5), _row("d", eval_loss=math.log(600.0), eval_round=5),
            _row("e"), _row("x", fingerprint="other", eval_loss=math.log(2.0), eval_round=9)]
    s = swarm_summary(rows)
    # round 5's three values 500, 600, 700: median 600; round 4's older value and another run's are left out
    assert (s["eval_ppl"], s["eval_round"]) == (600.0, 5)
    assert heldout_text(s) == " | held-out ppl 600 (θ 5)"
    assert swarm_summary([_row("e")])["eval_ppl"] is None and heldout_text(swarm_summary([_row("e")])) == ""
    # the record carries it; the table row turns it into a perplexity
    from p2p_photon.monitor.state import PeerView

    rec = _record("12D3KooWpeer0001", eval_loss=math.log(50.0), eval_round=2)
    row = peer_row(PeerView(rec, seen_at=0.0, observations=1), now=1.0, gone_after=30.0)
    assert row["eval_ppl"] == 50.0 and row["eval_round"] == 2
