#!/usr/bin/env python
"""Churn soak: a local swarm in which a random peer is SIGKILLed and a peer started every 10 s.

    python scripts/soak.py                  # bootstrap + 6 peers, churn every 10 s for 150 s
    python scripts/soak.py --minutes 10     # a longer soak
    python scripts/soak.py --keep 0         # any peer may be killed (default: the first one never is)
    python scripts/soak.py --quick          # the ~60 s smoke version (4 peers, 30 s of churn)

Real processes on 127.0.0.1 (`LocalSwarm`), the nano model on a small stdlib corpus that the script
prepares itself. Once every initial peer has averaged a round, every `--interval` s one random peer
(among those that have joined the DHT) is SIGKILLed and one is started: alternately a new peer, or
the one just killed with `--resume` from its checkpoint directory (peers checkpoint every round).
The first `--keep` initial peers are never killed: they live through the whole run, and their memory
over minutes of churn is what the RSS slope is measured on (a peer that lives 30 s shows its warm-up,
not a leak).
After the churn the survivors train until each has averaged a round without churn; when all of them
hold the same θ and train the next round they get SIGTERM together (they finish the step,
checkpoint, write their summary).

Where the figures come from: rounds from the peers' own logs (every peer logs one line per
attempt at a round, `round R | ... | θ H` or `round R | ... | FAILED (why)`; a SIGKILLed peer
writes no summary, its log is all there is), the final θ from the survivors' summaries, RSS by
sampling each peer's process tree (the peer, its DHT and averager children, p2pd) with psutil,
and the processes left afterwards by the environment tag every process of the run inherits.

Prints a table with PASS/FAIL per target, writes bench/results/soak.json and a plot next to it
(RSS over time, rounds completed over time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402
import psutil  # noqa: E402

from p2p_photon import zygote  # noqa: E402
from p2p_photon.launch import LocalSwarm, Proc  # noqa: E402

TAG_VAR = "P2P_PHOTON_SOAK_TAG"  # every process of a soak inherits it: p2pd left behind is still ours
SMALL_DATA = ["data.max_corpus_mb=1", "data.vocab_size=1024", "data.num_silos=3"]
SILOS = 3
TARGETS = dict(rounds_complete_min=0.90, distinct_theta_at_end=1, joiner_rounds_max=2,
               rss_slope_mb_per_min_max=1.0, processes_left=0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=None, help="peers alive at a time (default 6; --quick 4)")
    p.add_argument("--minutes", type=float, default=None, help="minutes of churn (default 2.5; --quick 0.5)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between kills (default 10)")
    p.add_argument("--seed", type=int, default=0, help="which peer is killed when (default 0)")
    p.add_argument("--quick", action="store_true", help="the smoke version: 4 peers, 30 s of churn")
    p.add_argument("--keep", type=int, default=None,
                   help="initial peers never killed, the RSS slope's long series (default 1; --quick 0)")
    p.add_argument("--rss-every", type=float, default=3.0, help="seconds between RSS samples (default 3)")
    p.add_argument("--settle", type=float, default=None,
                   help="most seconds after the churn for the survivors to agree (default 150; --quick 90)")
    p.add_argument("--workdir", default=None, help="logs, checkpoints, summaries (default runs/soak/<time>)")
    p.add_argument("--cache", default=str(ROOT / "runs" / "soak-data"), help="prepared-data cache (reused)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every peer (repeatable)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.json"), help="JSON output path")
    args = p.parse_args(argv)
    args.peers = args.peers or (4 if args.quick else 6)
    args.minutes = args.minutes if args.minutes is not None else (0.5 if args.quick else 2.5)
    args.keep = args.keep if args.keep is not None else (0 if args.quick else 1)
    if not 0 <= args.keep <= args.peers:
        p.error(f"--keep must be between 0 and --peers ({args.peers})")
    args.settle = args.settle if args.settle is not None else (90.0 if args.quick else 150.0)
    args.workdir = Path(args.workdir or ROOT / "runs" / "soak" / time.strftime("%Y%m%d-%H%M%S"))
    if args.workdir.exists() and any(args.workdir.iterdir()):  # another run's logs and checkpoints: a
        # resumed peer would take that run's checkpoint (and refuse it, another fingerprint)
        p.error(f"--workdir {args.workdir} is not empty: give a new directory, or leave --workdir out")
    return args


def peer_overrides(cache: str, run_id: str) -> list[str]:
    """A nano swarm on a small corpus (as the swarm tests run it), with the averaging timeouts set
    generously for a loaded 2-core machine, and a checkpoint every round (for --resume)."""
    return [*SMALL_DATA, f"data.cache_dir={cache}", "model.seq_len=64", "inner.batch_size=8",
            "inner.warmup_steps=5", "inner.total_steps=2000", "rounds.target_samples_per_round=192",
            "averaging.matchmaking_time=3.0", "averaging.allreduce_timeout=40", "averaging.round_timeout=90",
            "logging.progress_interval=0.5", "logging.progress_bar=false", "logging.eval_batches=4",
            "checkpoint.every_rounds=1", "dht.startup_timeout=90", f"dht.run_id={run_id}"]


def prepare_data(cache: str) -> None:
    from p2p_photon import data
    from p2p_photon.config import load_config

    cfg = load_config(None, [*SMALL_DATA, f"data.cache_dir={cache}"])
    data.prepare(cfg.data, cfg.seed, progress=False)


# ----------------------------------------------------------------------------- reading a peer's log

LINE = re.compile(r"^(\d\d):(\d\d):(\d\d) \S+ [A-Z] [\w.]+: (.*)$")
OK = re.compile(r"^round (\d+) \| loss \S+ \| peers (\d+)/(\d+) \|.*\| θ ([0-9a-f]+)$")
FAILED = re.compile(r"^round (\d+) \| loss \S+ \| FAILED \((.*)\) \| failed rounds \d+$")
JOINED = re.compile(r"^peer \S+ is on the DHT of run")
SYNC = re.compile(r"^loaded state of round (\d+) \(global step \d+, θ ([0-9a-f]+)\)")
RESUMED = re.compile(r"^resumed from \S+: round (\d+),")


@dataclass
class LogEvents:
    """What one peer's log says, times in seconds since the soak started."""

    ok: list[tuple[float, int, str]] = field(default_factory=list)  # (t, round, θ after it)
    failed: list[tuple[float, int, str]] = field(default_factory=list)  # (t, round, why)
    syncs: list[tuple[float, int]] = field(default_factory=list)  # (t, round loaded)
    joined: float | None = None
    resumed_round: int | None = None
    last: str = ""  # the kind of the newest round event: "ok", "failed" or ""


def read_events(path: Path, t0: float) -> LogEvents:
    ev = LogEvents()
    if not path.exists():
        return ev
    day0 = datetime.fromtimestamp(t0).replace(hour=0, minute=0, second=0, microsecond=0)
    for line in path.read_text(errors="replace").splitlines():
        if not (m := LINE.match(line)):
            continue
        at = day0 + timedelta(hours=int(m[1]), minutes=int(m[2]), seconds=int(m[3]))
        t = at.timestamp() - t0 + (86400 if at.timestamp() < t0 - 3600 else 0)  # the log crossed midnight
        _add_event(ev, t, m[4])
    return ev


def _add_event(ev: LogEvents, t: float, msg: str) -> None:
    if m := OK.match(msg):
        ev.ok.append((t, int(m[1]), m[4]))
        ev.last = "ok"
    elif m := FAILED.match(msg):
        ev.failed.append((t, int(m[1]), m[2]))
        ev.last = "failed"
    elif m := SYNC.match(msg):
        ev.syncs.append((t, int(m[1])))
    elif m := RESUMED.match(msg):
        ev.resumed_round = int(m[1])
    elif JOINED.match(msg) and ev.joined is None:
        ev.joined = t


# ----------------------------------------------------------------------------- the soak


@dataclass
class PeerRun:
    """One peer process of the soak (a resumed peer is a new PeerRun with the same checkpoint dir)."""

    name: str
    base: str  # the peer whose checkpoint dir it uses
    kind: str  # "initial", "new" or "resume"
    proc: Proc
    started: float  # seconds since the soak started
    killed: float | None = None
    family: list = field(default_factory=list)  # its process tree at the kill
    family_gone_after_s: float | None = None  # seconds from the kill until that tree was gone
    rss: list[tuple[float, float]] = field(default_factory=list)  # (t, MB) of its whole process tree
    pss: list[tuple[float, float]] = field(default_factory=list)  # the same, shared pages divided among sharers
    rss_by_process: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # 'main', 'p2pd', 'child1'..


def _role(q: psutil.Process, k: int) -> str:
    """A peer's child process by what it is: p2pd, or its k-th other child (the DHT, then the averager)."""
    with contextlib.suppress(psutil.Error):
        if q.name().startswith("p2pd"):
            return f"p2pd{k}"
    return f"child{k}"


class Soak:
    def __init__(self, args: argparse.Namespace, run_id: str):
        self.args, self.rng = args, random.Random(args.seed)
        self.swarm = LocalSwarm(args.workdir, overrides=[*peer_overrides(args.cache, run_id), *args.overrides])
        self.peers: list[PeerRun] = []
        self.t0 = time.time()
        self.churn: list[dict] = []  # one entry per kill + start
        self.phases: dict[str, float] = {}
        self._next_index, self._next_rss = 0, 0.0
        self.aligned_stop = False  # the survivors got SIGTERM while all held one θ (else after a timeout)
        self.joined_at_stop: set[str] = set()  # survivors in the swarm (DHT joined) when they got SIGTERM
        self.quorum = max(2, args.peers // 2)  # joined peers a kill must leave (min_group_size is 2)
        self.kept = {f"peer{i}" for i in range(args.keep)}  # never killed: the RSS slope's long series

    def now(self) -> float:
        return time.time() - self.t0

    def live(self) -> list[PeerRun]:
        return [p for p in self.peers if p.killed is None and p.proc.alive()]

    def joined(self) -> list[PeerRun]:
        """Live peers that are in the swarm (their DHT is up): a peer still importing torch is not yet."""
        return [p for p in self.live() if self.events(p).joined is not None]

    def start(self, kind: str, base: str | None = None) -> PeerRun:
        if base is None:
            base, self._next_index = f"peer{self._next_index}", self._next_index + 1
        restarts = sum(p.base == base for p in self.peers)
        name = base if restarts == 0 else f"{base}-r{restarts}"
        silo = int(base.removeprefix("peer")) % SILOS
        proc = self.swarm.start_peer(silo, name=name, overrides=[f"data.silo={silo}",
                                     f"checkpoint.dir={self.swarm.workdir / ('ckpt-' + base)}"],
                                     extra_args=["--resume"] if kind == "resume" else [])
        run = PeerRun(name, base, kind, proc, self.now())
        self.peers.append(run)
        return run

    def kill(self, victim: PeerRun) -> None:
        with contextlib.suppress(psutil.Error):
            victim.family = psutil.Process(victim.proc.popen.pid).children(recursive=True)
        victim.proc.popen.send_signal(signal.SIGKILL)
        victim.proc.popen.wait()
        victim.killed = self.now()

    def events(self, p: PeerRun) -> LogEvents:
        return read_events(p.proc.log, self.t0)

    # ------------------------------------------------------------------ phases

    def run(self) -> None:
        self.swarm.start_bootstrap(timeout=300)  # a busy machine takes minutes to import and start it
        for _ in range(self.args.peers):
            self.start("initial")
        self.phases["bootstrap_up"] = self.now()
        self.wait_until(lambda: all(self.events(p).ok for p in self.live()) and len(self.live()) == self.args.peers,
                        timeout=600, what="every initial peer to average a round")
        self.phases["churn_start"] = self.now()
        self.churn_loop(self.now() + 60 * self.args.minutes)
        self.phases["churn_end"] = self.now()
        self.settle()
        self.phases["settled"] = self.now()
        self.stop_aligned(timeout=60.0 if self.args.quick else 120.0)
        self.phases["stopped"] = self.now()

    def churn_loop(self, until: float) -> None:
        """Every interval: kill one joined peer (never a kept one) and start one (new and resumed
        alternately). A tick at which the kill would leave fewer than `quorum` joined peers is skipped:
        joiners are still starting (on a busy machine a peer takes minutes to import and start), and
        killing the last holders of θ would test nothing but that."""
        tick, new_next = self.now() + self.args.interval, True
        while tick <= until:
            self.idle_until(tick)
            tick += self.args.interval
            joined = self.joined()
            victim = pick_victim(joined, self.kept, self.quorum, self.rng)
            if victim is None:
                self.churn.append(dict(t=round(self.now(), 1), killed=None, started=None, kind="skipped",
                                       joined=len(joined)))
                print(f"[soak] t={self.now():6.1f}s skipped: {len(joined)} peers joined, "
                      f"{len(self.kept)} of them never killed", flush=True)
                continue
            self.kill(victim)
            joiner = self.start("new") if new_next else self.start("resume", victim.base)
            self.churn.append(dict(t=round(self.now(), 1), killed=victim.name, started=joiner.name, kind=joiner.kind,
                                   joined=len(joined)))
            print(f"[soak] t={self.now():6.1f}s killed {victim.name}, started {joiner.name} ({joiner.kind}); "
                  f"{len(joined) - 1} joined peers left", flush=True)
            new_next = not new_next

    def settle(self) -> None:
        """Every survivor averages a round after the churn (the last joiner included)."""
        end = self.phases["churn_end"]
        ok = self.wait_until(lambda: all(any(t >= end for t, _, _ in self.events(p).ok) for p in self.live()),
                             timeout=self.args.settle, what=None)
        if not ok:
            print(f"[soak] not every survivor averaged a round within {self.args.settle:.0f}s after the churn",
                  flush=True)

    def stop_aligned(self, timeout: float = 120.0) -> None:
        """SIGTERM the survivors together while all that have joined the swarm hold the same θ and train
        the next round, so that each ends on that θ; after `timeout` s of disagreement they are stopped
        anyway. (A peer still starting is not in the swarm: it is stopped too, and not compared.)"""
        def aligned() -> bool:
            evs = [self.events(p) for p in self.joined()]
            lasts = {(e.ok[-1][1], e.ok[-1][2]) for e in evs if e.ok and e.last == "ok"}
            return len(lasts) == 1 and all(e.ok and e.last == "ok" for e in evs)

        self.aligned_stop = self.wait_until(aligned, timeout=timeout, what=None, interval=0.2)
        self.phases["sigterm"] = self.now()
        self.joined_at_stop = {p.name for p in self.joined()}
        survivors = self.live()
        for p in survivors:
            self.swarm.signal(p.proc, signal.SIGTERM)
        deadline = time.monotonic() + 120
        for p in survivors:
            with contextlib.suppress(Exception):
                p.proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.swarm.stop(grace=30)

    def wait_until(self, pred, timeout: float, what: str | None, interval: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                if what is None:
                    return False
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            self.idle(interval)
        return True

    def idle_until(self, t: float) -> None:
        while self.now() < t:
            self.idle(min(0.5, t - self.now()))

    def idle(self, seconds: float) -> None:
        """Sleep, sampling RSS and checking the trees of killed peers on the way."""
        if self.now() >= self._next_rss:
            self.sample_rss()
            self._next_rss = self.now() + self.args.rss_every
        self.check_families()
        time.sleep(max(0.0, seconds))

    def sample_rss(self) -> None:
        t = self.now()
        for p in self.live():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(p.proc.popen.pid)
                rss = pss = 0
                children = sorted(root.children(recursive=True), key=lambda q: q.pid)
                roles = ["main"] + [_role(q, k) for k, q in enumerate(children, 1)]
                for q, role in zip([root, *children], roles):
                    with contextlib.suppress(psutil.Error):
                        mem = q.memory_full_info()
                        rss, pss = rss + mem.rss, pss + getattr(mem, "pss", 0)
                        p.rss_by_process.setdefault(role, []).append((round(t, 2), round(mem.rss / 2**20, 2)))
                p.rss.append((round(t, 2), round(rss / 2**20, 2)))
                p.pss.append((round(t, 2), round(pss / 2**20, 2)))

    def check_families(self) -> None:
        for p in self.peers:
            if p.killed is not None and p.family_gone_after_s is None and not _alive(p.family):
                p.family_gone_after_s = round(self.now() - p.killed, 1)


def pick_victim(joined: list, kept: set[str], quorum: int, rng: random.Random):
    """The joined peer to SIGKILL at a tick: a random one not in `kept`; None when none may be killed or
    the kill would leave fewer than `quorum` joined peers."""
    candidates = [p for p in joined if p.name not in kept]
    if not candidates or len(joined) - 1 < quorum:
        return None
    return rng.choice(candidates)


def _alive(procs: list) -> list:
    out = []
    for q in procs:
        with contextlib.suppress(psutil.Error):
            if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                out.append(q)
    return out


def leftovers(tag: str, timeout: float = 15.0) -> list[dict]:
    """Processes of this soak (any name) still running `timeout` s after the swarm stopped; they are
    then ended (they are ours: they carry the tag) and returned as a finding."""
    from p2p_photon.network import tagged_processes
    from p2p_photon.watchdog import reap

    me = os.getpid()
    find = lambda: [q for q in tagged_processes(TAG_VAR, tag) if q.pid != me]  # noqa: E731
    deadline = time.monotonic() + timeout
    while (left := find()) and time.monotonic() < deadline:
        time.sleep(0.5)
    found = []
    for q in left:
        with contextlib.suppress(psutil.Error):
            found.append(dict(pid=q.pid, name=q.name(), cmdline=" ".join(q.cmdline())[:200]))
    reap(left)
    return found


# ----------------------------------------------------------------------------- the figures


def peer_record(soak: Soak, p: PeerRun, ev: LogEvents, swarm_ok: list[tuple[float, int, str]]) -> dict:
    """Rounds attempted and completed, kill/start times, joiner figures, RSS slope of one peer."""
    rec = dict(name=p.name, base=p.base, kind=p.kind, started_s=round(p.started, 1),
               joined_s=_r(ev.joined), killed_s=_r(p.killed), exit_code=p.proc.popen.returncode,
               rounds_completed=len(ev.ok), rounds_failed=len(ev.failed),
               rounds_attempted=len(ev.ok) + len(ev.failed),
               interrupted_by_kill=p.killed is not None and ev.joined is not None,
               first_round=ev.ok[0][1] if ev.ok else None, last_round=ev.ok[-1][1] if ev.ok else None,
               syncs=[r for _, r in ev.syncs], resumed_round=ev.resumed_round,
               failures=[dict(t=round(t, 1), round=r, why=w) for t, r, w in ev.failed],
               tree_gone_after_kill_s=p.family_gone_after_s if p.killed is not None else None,
               tree_at_kill=len(p.family))
    if p.kind != "initial":
        rec["joiner"] = joiner_figures(p, ev, swarm_ok)
    warm = {p.name: _first_ok_time(ev)}
    slope, span, _ = rss_slope({p.name: p.rss}, warm)
    pss_slope, _, _ = rss_slope({p.name: p.pss}, warm)
    rec.update(pss_slope_mb_per_min=_r(pss_slope, 3), pss_mb_last=p.pss[-1][1] if p.pss else None)
    rec.update(rss_mb_first=p.rss[0][1] if p.rss else None, rss_mb_last=p.rss[-1][1] if p.rss else None,
               rss_samples=len(p.rss), rss_slope_mb_per_min=_r(slope, 3), rss_span_s=_r(span))
    # where the growth is: each process of the tree on its own (main, DHT/averager children, p2pd)
    rec["rss_slope_by_process"] = {role: _r(rss_slope({role: xs}, {role: warm[p.name]})[0], 3)
                                   for role, xs in sorted(p.rss_by_process.items())}
    rec["rss_mb_last_by_process"] = {role: xs[-1][1] for role, xs in sorted(p.rss_by_process.items())}
    return rec


def joiner_figures(p: PeerRun, ev: LogEvents, swarm_ok: list[tuple[float, int, str]]) -> dict:
    """Seconds and rounds from a joiner's start (and from its DHT join) to its first averaged round.

    rounds = (its first averaged round) − (the round the swarm was training at that moment) + 1: one
    when it takes part in the round in progress. A joiner killed before the swarm finished the round
    after the one in progress at its join (the target's 2 rounds) had no full chance to contribute:
    `censored`, not counted against the target. (Counting any two rounds finished meanwhile judged a
    joiner killed 7 s after its join, while lagging groups finished two old rounds.)"""
    def swarm_round(t: float) -> int:
        done = [r for tt, r, _ in swarm_ok if tt <= t]
        return max(done) + 1 if done else 0

    out = dict(start_round=swarm_round(p.started), join_round=swarm_round(ev.joined) if ev.joined is not None
               else None, contributed=bool(ev.ok))
    if ev.ok:
        t, r, _ = ev.ok[0]
        out.update(first_ok_round=r, seconds_from_start=round(t - p.started, 1),
                   rounds_from_start=r - out["start_round"] + 1)
        if ev.joined is not None:
            out.update(seconds_from_join=round(t - ev.joined, 1), rounds_from_join=r - out["join_round"] + 1)
        return out
    end = p.killed if p.killed is not None else float("inf")
    after = {r for tt, r, _ in swarm_ok if ev.joined is not None and ev.joined <= tt <= end}
    out["censored"] = out["join_round"] is None or not any(r >= out["join_round"] + 1 for r in after)
    out["swarm_rounds_while_alive_after_join"] = len(after)
    return out


def _first_ok_time(ev: LogEvents) -> float:
    return ev.ok[0][0] if ev.ok else float("inf")


def rss_slope(series: dict[str, list[tuple[float, float]]], warmup: dict[str, float],
              min_span: float = 0.0) -> tuple[float | None, float, list[str]]:
    """Least-squares slope (MB/min) of memory over time: one slope shared by the peers, each with its
    own intercept (samples centred per peer). Only samples after a peer's `warmup` time (its first
    averaged round: model, optimizer state, DHT and averager all exist by then), and only peers with
    `min_span` s of them. Returns (slope or None, the longest span used, the peers used)."""
    num = den = span = 0.0
    used = []
    for name, samples in series.items():
        pts = [(t, m) for t, m in samples if t >= warmup[name]]
        if len(pts) < 3 or pts[-1][0] - pts[0][0] < max(min_span, 1e-9):
            continue
        tm, mm = sum(t for t, _ in pts) / len(pts), sum(m for _, m in pts) / len(pts)
        num += sum((t - tm) * (m - mm) for t, m in pts)
        den += sum((t - tm) ** 2 for t, _ in pts)
        span = max(span, pts[-1][0] - pts[0][0])
        used.append(name)
    return (num / den * 60.0 if den > 0 else None), span, used


def forked_rounds(evs: dict[str, LogEvents]) -> dict[int, list[str]]:
    """Rounds that peers ended with more than one θ: round -> the distinct θ (8 hex digits)."""
    by_round: dict[int, set[str]] = {}
    for ev in evs.values():
        for _, r, h in ev.ok:
            by_round.setdefault(r, set()).add(h[:8])
    return {r: sorted(hs) for r, hs in sorted(by_round.items()) if len(hs) > 1}


def final_theta(soak: Soak, survivors: list[PeerRun]) -> dict:
    """The survivors' final θ and round, from the summaries they wrote at SIGTERM, and each one's θ at the
    common round (the fewest rounds any survivor has): SIGTERM reaches peers that are training (they leave
    at once) and peers already averaging (they finish that round first), so one model can end one round
    apart on two peers; at the common round they must hold the same θ (from their round histories)."""
    out, histories = {}, {}
    for p in survivors:
        try:
            s = soak.swarm.summary(p.name)
            out[p.name] = dict(theta=s["theta"], rounds=s["rounds"], failed_rounds=s["failed_rounds"])
            histories[p.name] = s.get("history") or []
        except (OSError, ValueError, KeyError) as e:
            out[p.name] = dict(theta=None, rounds=None, error=f"no summary: {e}")
    rounds = [f["rounds"] for f in out.values() if f["rounds"] is not None]
    common = min(rounds) if rounds and len(rounds) == len(out) else None
    for name, f in out.items():
        if common is None:
            f["theta_at_common_round"] = None
        elif f["rounds"] == common:
            f["theta_at_common_round"] = f["theta"]
        else:  # θ after averaging round common - 1
            f["theta_at_common_round"] = next((h["theta"] for h in reversed(histories[name])
                                               if h.get("ok") and h.get("round") == common - 1), None)
    return out


def swarm_totals(recs: list[dict], evs: dict[str, LogEvents], finals: dict, soak: Soak) -> dict:
    ok = sum(r["rounds_completed"] for r in recs)
    attempted = sum(r["rounds_attempted"] for r in recs)
    forks = forked_rounds(evs)
    rounds = sorted({r for ev in evs.values() for _, r, _ in ev.ok})
    joiners = [r["joiner"] for r in recs if "joiner" in r]
    judged = [j for j in joiners if j["contributed"] or not j.get("censored")]
    rounds_needed = [j["rounds_from_join"] for j in judged if j.get("rounds_from_join") is not None]
    never = [r["name"] for r in recs if "joiner" in r and not r["joiner"]["contributed"]
             and not r["joiner"].get("censored")]
    eligible = [p for p in soak.peers if p.killed is None]
    warm = {p.name: _first_ok_time(evs[p.name]) for p in soak.peers}
    min_span = min(60.0, 30 * soak.args.minutes)
    slope, span, used = rss_slope({p.name: p.rss for p in eligible}, warm, min_span)
    pss_slope, _, _ = rss_slope({p.name: p.pss for p in eligible}, warm, min_span)
    thetas = {f["theta"] for f in finals.values()}
    at_common = {f.get("theta_at_common_round") for f in finals.values()}
    by_round: dict[int, set] = {}
    for f in finals.values():
        by_round.setdefault(f["rounds"], set()).add(f["theta"])
    return dict(
        peer_rounds_attempted=attempted, peer_rounds_completed=ok, peer_rounds_failed=attempted - ok,
        completed_fraction=ok / attempted if attempted else 0.0,
        peer_rounds_interrupted_by_kill=sum(bool(r["interrupted_by_kill"]) for r in recs),
        swarm_rounds_completed=len(rounds), last_round=rounds[-1] if rounds else None,
        rounds_with_more_than_one_theta=len(forks), forked_rounds=forks,
        survivors=len(finals), final_thetas=sorted(str(t) for t in thetas), final_theta_count=len(thetas),
        final_rounds=sorted({f["rounds"] for f in finals.values() if f["rounds"] is not None}),
        theta_count_at_common_round=len(at_common) if None not in at_common else None,
        one_theta_per_final_round=all(len(v) == 1 for v in by_round.values()),
        joiners=len(joiners), joiners_judged=len(judged), joiners_censored=len(joiners) - len(judged),
        joiner_rounds_max=max(rounds_needed) if rounds_needed else None, joiners_never_contributed=never,
        joiner_seconds_from_start=[j["seconds_from_start"] for j in joiners if j["contributed"]],
        joiner_seconds_from_join=[j.get("seconds_from_join") for j in joiners if j["contributed"]],
        joiner_rounds_from_start=[j["rounds_from_start"] for j in joiners if j["contributed"]],
        rss_slope_mb_per_min=_r(slope, 3), pss_slope_mb_per_min=_r(pss_slope, 3),
        rss_slope_peers=used,
        rss_slope_span_s=_r(span), kills=sum(c["killed"] is not None for c in soak.churn),
        ticks_skipped=sum(c["kind"] == "skipped" for c in soak.churn), quorum_after_kill=soak.quorum,
        killed_trees_not_gone=[p.name for p in soak.peers if p.killed is not None and p.family_gone_after_s is None],
    )


def verdicts(sw: dict, left: list[dict]) -> dict:
    t = TARGETS
    jmax = sw["joiner_rounds_max"]
    return dict(
        rounds_complete=sw["completed_fraction"] >= t["rounds_complete_min"],
        one_theta_at_end=sw["theta_count_at_common_round"] == 1 and sw["one_theta_per_final_round"]
        and None not in sw["final_thetas"] and sw["survivors"] > 0,
        joiners_contribute=jmax is not None and jmax <= t["joiner_rounds_max"] and not sw["joiners_never_contributed"],
        rss_slope=sw["rss_slope_mb_per_min"] is not None and sw["rss_slope_mb_per_min"] < t["rss_slope_mb_per_min_max"],
        nothing_left_running=not left and not sw["killed_trees_not_gone"],
    )


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


# ----------------------------------------------------------------------------- report


def print_table(recs: list[dict], sw: dict, ok: dict, left: list[dict]) -> None:
    print(f"\n{'peer':<10} {'kind':<8} {'start':>6} {'killed':>7} {'att':>4} {'ok':>4} {'fail':>5} "
          f"{'join→ok s':>10} {'rounds':>6} {'RSS MB':>7} {'MB/min':>7}")
    for r in recs:
        j = r.get("joiner", {})
        print(f"{r['name']:<10} {r['kind']:<8} {r['started_s']:>6.0f} {_fmt(r['killed_s']):>7} "
              f"{r['rounds_attempted']:>4} {r['rounds_completed']:>4} {r['rounds_failed']:>5} "
              f"{_fmt(j.get('seconds_from_join')):>10} {_fmt(j.get('rounds_from_join')):>6} "
              f"{_fmt(r['rss_mb_last']):>7} {_fmt(r['rss_slope_mb_per_min']):>7}")
    rows = [
        ("rounds complete", f"{sw['peer_rounds_completed']}/{sw['peer_rounds_attempted']} = "
         f"{100 * sw['completed_fraction']:.1f}%", ">= 90%", ok["rounds_complete"]),
        ("one θ at the end", f"{sw['theta_count_at_common_round']} θ at the common round over {sw['survivors']} "
         f"survivors (final rounds {sw['final_rounds']}, {sw['final_theta_count']} final θ, one per round: "
         f"{sw['one_theta_per_final_round']}); {sw['rounds_with_more_than_one_theta']} round(s) ended with > 1 θ", "1",
         ok["one_theta_at_end"]),
        ("joiners contribute", f"max {sw['joiner_rounds_max']} round(s) from join ({sw['joiners_judged']} judged, "
         f"{sw['joiners_censored']} killed first); never: {sw['joiners_never_contributed'] or 'none'}",
         "<= 2 rounds", ok["joiners_contribute"]),
        ("RSS slope", f"{_fmt(sw['rss_slope_mb_per_min'])} MB/min over {len(sw['rss_slope_peers'])} survivors "
         f"({_fmt(sw['rss_slope_span_s'])} s)", "< 1 MB/min", ok["rss_slope"]),
        ("left running", f"{len(left)} processes; killed trees not gone: {sw['killed_trees_not_gone'] or 0}",
         "0", ok["nothing_left_running"]),
    ]
    print(f"\n{sw['kills']} kills, {sw['ticks_skipped']} ticks skipped (a kill would have left fewer than "
          f"{sw['quorum_after_kill']} joined peers), {sw['swarm_rounds_completed']} swarm rounds, "
          f"{sw['peer_rounds_interrupted_by_kill']} attempts cut by a kill")
    print(f"\n{'target':<20} {'measured':<70} {'want':<12} verdict")
    for name, got, want, passed in rows:
        print(f"{name:<20} {got:<70} {want:<12} {'PASS' if passed else 'FAIL'}")


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if isinstance(x, float) else str(x)


def plot(soak: Soak, evs: dict[str, LogEvents], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, k, b) = plt.subplots(3, 1, figsize=(10, 9), sharex=True, gridspec_kw=dict(height_ratios=[3, 2, 2]))
    named = len(soak.peers) <= 12  # a long run starts a hundred peers: a legend of them hides the plot
    for p in soak.peers:
        if p.rss:
            kept = p.name in soak.kept
            a.plot([t for t, _ in p.rss], [m for _, m in p.rss], lw=1.6 if kept else 0.8, color="k" if kept else None,
                   label=p.name if named or kept else None, zorder=3 if kept else 2)
    _plot_kept(k, soak, evs)
    oks = sorted((t, r) for ev in evs.values() for t, r, _ in ev.ok)
    b.step([t for t, _ in oks], range(1, len(oks) + 1), where="post", label="peer-rounds averaged")
    b.step([t for t, _ in oks], _running_max([r + 1 for _, r in oks]), where="post", label="swarm rounds done")
    fails = sorted(t for ev in evs.values() for t, _, _ in ev.failed)
    b.plot(fails, [0] * len(fails), "rx", label="failed attempt")
    for ax in (a, b):
        for c in soak.churn:
            if c["killed"] is not None:
                ax.axvline(c["t"], color="grey", lw=0.5, ls=":")
    a.set_ylabel("RSS of peer process tree (MB)")
    a.legend(fontsize=7, ncol=4 if named else 1, title=None if named else "black: kept peers; the others unnamed",
             title_fontsize=7)
    b.set_ylabel("rounds")
    b.set_xlabel("seconds since start (dotted: kill + start)")
    b.legend(fontsize=8)
    a.set_title(f"churn soak: {soak.args.peers} peers, a SIGKILL every {soak.args.interval:g} s")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_kept(ax, soak: Soak, evs: dict[str, LogEvents]) -> None:
    """The never-killed peers' RSS after their first averaged round, on their own scale, with the slope."""
    for p in soak.peers:
        if p.name not in soak.kept or not p.rss:
            continue
        warm = _first_ok_time(evs[p.name])
        pts = [(t, m) for t, m in p.rss if t >= warm]
        slope = rss_slope({p.name: pts}, {p.name: warm})[0] if len(pts) >= 3 else None
        ax.plot([t for t, _ in pts], [m for _, m in pts], lw=1,
                label=f"{p.name}: {slope:.2f} MB/min" if slope is not None else p.name)
    ax.set_ylabel("kept peers' RSS\nafter warm-up (MB)")
    if ax.lines:
        ax.legend(fontsize=8)


def _running_max(xs: list[int]) -> list[int]:
    out, m = [], -1
    for x in xs:
        m = max(m, x)
        out.append(m)
    return out


def build_result(soak: Soak, args, tag_left: list[dict], cpu0, load0) -> tuple[dict, list[dict], dict]:
    evs = {p.name: soak.events(p) for p in soak.peers}
    swarm_ok = sorted((t, r, h) for ev in evs.values() for t, r, h in ev.ok)
    recs = [peer_record(soak, p, evs[p.name], swarm_ok) for p in soak.peers]
    survivors = [p for p in soak.peers if p.killed is None]
    finals = final_theta(soak, [p for p in survivors if p.name in soak.joined_at_stop])
    sw = swarm_totals(recs, evs, finals, soak)
    ok = verdicts(sw, tag_left)
    machine = dict(benchlib.machine_info(), loadavg_before=list(load0), loadavg_after=list(os.getloadavg()),
                   other_busy_cores=round(benchlib.other_cores(cpu0, benchlib.cpu_seconds()), 2))
    result = dict(
        command=shlex.join([Path(sys.executable).name, *sys.argv]), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=machine, settings=settings(args, soak), phases_s={k: round(v, 1) for k, v in soak.phases.items()},
        targets=TARGETS, verdicts=ok, passed=all(ok.values()), swarm=sw, final_theta=finals,
        processes_left=tag_left, churn=soak.churn, peers=recs,
        aligned_stop=soak.aligned_stop,
        survivors_not_joined_at_stop=[p.name for p in survivors if p.name not in soak.joined_at_stop],
        rss=[dict(name=p.name, rss_mb=p.rss, pss_mb=p.pss) for p in soak.peers],
        source=("rounds: parsed from every peer's log (killed peers write no summary); final θ: the survivors' "
                "summaries; RSS: psutil, the sum over each peer's process tree (peer, DHT and averager children, "
                "p2pd; pages shared after fork count once per process, PSS divides them)"))
    return result, recs, ok


def settings(args, soak: Soak) -> dict:
    return dict(peers=args.peers, interval_s=args.interval, churn_minutes=args.minutes, seed=args.seed,
                quick=args.quick, keep=sorted(soak.kept), rss_every_s=args.rss_every, settle_s=args.settle,
                workdir=str(args.workdir),
                peer_overrides=soak.swarm.overrides,
                note=("averaging timeouts set for a loaded 2-core machine: matchmaking_time 3 s, allreduce_timeout "
                      "40 s, round_timeout 90 s; checkpoint every round (for --resume); one torch thread per peer; "
                      "joiner rounds are counted from its DHT join ('is on the DHT' in its log), seconds from both its "
                      "process start and its join; the peer killed at each tick is drawn from the live peers that have "
                      "joined the DHT (a process still importing torch is not in the swarm yet), and a tick is skipped "
                      "(no kill, no start) when the kill would leave fewer than `quorum_after_kill` joined peers; the "
                      "final θ is compared over the survivors that had joined the DHT before the stop"))


def main(argv=None) -> int:
    args = parse_args(argv)
    tag = uuid.uuid4().hex
    os.environ[TAG_VAR] = tag  # inherited by every process the swarm starts, p2pd included
    load0, cpu0 = os.getloadavg(), benchlib.cpu_seconds()
    print(f"[soak] preparing data in {args.cache}; logs in {args.workdir}", flush=True)
    prepare_data(args.cache)
    soak = Soak(args, run_id=f"soak-{tag[:8]}")
    print(f"[soak] {args.peers} peers, a kill every {args.interval:g}s for {args.minutes:g} min (seed {args.seed})",
          flush=True)
    error = None
    try:
        soak.run()
    except (Exception, KeyboardInterrupt) as e:  # never warmed up, or interrupted: report what was seen, clean up
        error = f"{type(e).__name__}: {e}"
        print(f"[soak] {error}", flush=True)
    finally:
        soak.swarm.stop(grace=30)
        zygote.shutdown()  # the tests' process starter, if they asked for it: it carries the tag too
    left = leftovers(tag)
    result, recs, ok = build_result(soak, args, left, cpu0, load0)
    result["error"] = error
    print_table(recs, result["swarm"], ok, left)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(soak, {p.name: soak.events(p) for p in soak.peers}, out.with_suffix(".png"))
    print(f"[soak] wrote {out} and {out.with_suffix('.png')}; {'PASS' if result['passed'] else 'FAIL'}")
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
