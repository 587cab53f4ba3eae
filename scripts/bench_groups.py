#!/usr/bin/env python
"""One θ at any swarm size, measured: N peers on 127.0.0.1 with averaging.target_group_size G for several G
(G >= N: one group; G < N: several groups per round, joined by averaging/stages.py).

For each G the same swarm (nano model, the small stdlib corpus, the same seed, data and round target)
trains R rounds; reported per G: the distinct θ after each round (must be 1), the median round time and
averaging time, bytes sent per peer per round (mean and max: a group's representative sends more),
the final global step and tokens, and the held-out perplexity of the final model, compared with the
one-group run (target: within 2 %). Then a projection for a swarm of 1000 peers with the default
settings, from these measurements (see README).

    python scripts/bench_groups.py                       # 8 peers, G = 2, 4, 8, 4 rounds; bench/results/groups.json
    python scripts/bench_groups.py --quick               # 4 peers, G = 2, 4, 2 rounds (smoke)
    python scripts/bench_groups.py --peers 8 --groups 2 8 --rounds 6
    python scripts/bench_groups.py --repeats 3           # each G three times: the run-to-run spread

Equal tokens: every peer trains exactly --local-steps steps per round (rounds.max_local_steps; default
samples / (N x batch); the swarm's sample target is then out of reach, the step cap alone ends a
round), and every peer waits for the whole swarm before round 0 (rounds.start_peers = N: else the peers
that finish importing first average round 0 among themselves), so every run of every G trains on the
same sequences in the same order from the same initial θ, and the final perplexities differ only by
what the averaging did. With --local-steps 0 the swarm's progress ends each round instead: which peer
takes how many steps then depends on timing (2 cores, 8 processes), and two runs of one G differ by
several %.
Repeats: with --repeats K the comparison is of the K-run means, and the one-group runs' own spread
(max - min over mean) says how large a difference the measurement can resolve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import machine_info, reap_tagged_p2pd  # noqa: E402

from p2p_photon import data  # noqa: E402
from p2p_photon.config import load_config  # noqa: E402
from p2p_photon.files import write_json_atomic  # noqa: E402
from p2p_photon.launch import LocalSwarm  # noqa: E402

TAG_VAR = "P2P_PHOTON_BENCH_TAG"
BATCH = 8
UNREACHABLE = 10**9  # rounds.target_samples_per_round when every peer trains a fixed number of steps
SMALL = ["data.max_corpus_mb=1", "data.vocab_size=1024", "data.num_silos=4", "model.seq_len=64",
         f"inner.batch_size={BATCH}", "inner.warmup_steps=5", "inner.total_steps=400", "logging.progress_interval=0.5",
         "logging.progress_bar=false", "logging.eval_batches=8", "checkpoint.every_rounds=0",
         "dht.startup_timeout=120", "averaging.matchmaking_time=2.0", "averaging.allreduce_timeout=30",
         "averaging.round_timeout=40"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, default=None, help="swarm size N (default 8; --quick 4)")
    p.add_argument("--groups", type=int, nargs="+", default=None,
                   help="target_group_size values (default 2 4 N; --quick 2 N)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default 4; --quick 2)")
    p.add_argument("--samples", type=int, default=None,
                   help="rounds.target_samples_per_round (default 24 x N)")
    p.add_argument("--local-steps", type=int, default=None,
                   help="steps every peer trains per round (default samples / (N x batch); 0 = timing decides)")
    p.add_argument("--repeats", type=int, default=1, help="runs per G (default 1); figures compare the means")
    p.add_argument("--quick", action="store_true", help="smoke: 4 peers, G = 2 and 4, 2 rounds")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take (default 900)")
    p.add_argument("--workdir", default=None, help="logs and summaries (default: runs/bench_groups-<time>)")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "p2p_photon"), help="prepared data cache")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/groups.json; --quick: workdir)")
    args = p.parse_args(argv)
    args.peers = args.peers or (4 if args.quick else 8)
    args.groups = args.groups or ([2, args.peers] if args.quick else [2, 4, args.peers])
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.samples = args.samples or 24 * args.peers
    if args.local_steps is None:
        args.local_steps = max(1, args.samples // (args.peers * BATCH))
    if args.local_steps < 0:
        p.error("--local-steps must be >= 0 (0 = the swarm's progress ends each round)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.peers < 2 or min(args.groups) < 2:
        p.error("--peers and every --groups value must be >= 2 (averaging.min_group_size is 2)")
    return args


def run_one(args, group: int, workdir: Path) -> dict:
    """One swarm of args.peers peers with target_group_size `group`; its per-round and final figures."""
    # with equal steps, only the step cap ends a round: the swarm's progress estimate (which extrapolates
    # the others' samples) would end a late starter's round a step or two early
    target = UNREACHABLE if args.local_steps else args.samples
    overrides = [*SMALL, f"data.cache_dir={args.cache_dir}", f"rounds.num_rounds={args.rounds}",
                 f"rounds.target_samples_per_round={target}", f"averaging.target_group_size={group}",
                 f"rounds.max_local_steps={args.local_steps}", f"rounds.start_peers={args.peers}",
                 f"dht.run_id=groups-{uuid.uuid4().hex[:8]}"]
    tag = os.environ[TAG_VAR] = uuid.uuid4().hex  # inherited by every process of the run, p2pd included
    names = [f"peer{i}" for i in range(args.peers)]
    t0 = time.monotonic()
    with LocalSwarm(workdir, overrides=overrides) as swarm:
        swarm.start_bootstrap()
        procs = [swarm.start_peer(i % 4, name=n) for i, n in enumerate(names)]
        codes = swarm.wait(procs, timeout=args.timeout)
    leaked = reap_tagged_p2pd(TAG_VAR, tag)
    summaries = {n: json.loads(swarm.summary_path(n).read_text()) for n in names if swarm.summary_path(n).exists()}
    return dict(target_group_size=group, exit_codes=codes, wall_s=time.monotonic() - t0, p2pd_leaked=len(leaked),
                **figures(summaries, args.rounds))


def figures(summaries: dict[str, dict], rounds: int) -> dict:
    ok = {n: {h["round"]: h for h in s["history"] if h["ok"]} for n, s in summaries.items()}
    per_round = []
    for r in range(rounds):
        done = [h[r] for h in ok.values() if r in h]
        ends = sorted(h["time"] for h in done)
        per_round.append(dict(round=r, peers_averaged=len(done), distinct_theta=len({h["theta"] for h in done}),
                              spanned=max((h["group"] for h in done), default=0),
                              allreduce_s=statistics.median(h["allreduce_s"] for h in done) if done else None,
                              sent_mean=statistics.mean(h["sent"] for h in done) if done else 0,
                              sent_max=max((h["sent"] for h in done), default=0),
                              end_time=ends[len(ends) // 2] if ends else None))
    times = [b["end_time"] - a["end_time"] for a, b in zip(per_round, per_round[1:]) if a["end_time"] and b["end_time"]]
    final = [s["final_loss"] for s in summaries.values()]
    return dict(
        per_round=per_round, final_theta=sorted({s["theta"] for s in summaries.values()}),
        one_theta_every_round=all(x["distinct_theta"] == 1 for x in per_round),
        one_theta_at_end=len({s["theta"] for s in summaries.values()}) == 1,
        failed_rounds=sum(s["failed_rounds"] for s in summaries.values()),
        round_s=statistics.median(times) if times else None,
        allreduce_s=statistics.median(x["allreduce_s"] for x in per_round if x["allreduce_s"] is not None),
        bytes_per_peer_round=statistics.mean(x["sent_mean"] for x in per_round),
        bytes_max_peer_round=max(x["sent_max"] for x in per_round),
        global_step=max(s["global_step"] for s in summaries.values()),
        total_samples=max(s["total_samples"] for s in summaries.values()),
        final_ppl=math.exp(statistics.median(final)), num_params=next(iter(summaries.values()))["num_params"])


def ppl_by_group(runs: list[dict], peers: int) -> dict:
    """Per G: mean final ppl over its runs, spread ((max - min) / mean), and the mean vs the one-group mean."""
    groups: dict[int, list[float]] = {}
    for r in runs:
        groups.setdefault(r["target_group_size"], []).append(r["final_ppl"])
    one = [p for g, ps in groups.items() if g >= peers for p in ps]
    base = statistics.mean(one) if one else None
    return dict(one_group_mean=base, groups={
        g: dict(runs=len(ps), mean=statistics.mean(ps), spread=(max(ps) - min(ps)) / statistics.mean(ps),
                vs_one_group=statistics.mean(ps) / base - 1 if base else None) for g, ps in groups.items()})


def projection(runs: list[dict], peers: int) -> dict:
    """What 1000 peers with the defaults (target_group_size 64) would do, from the measured runs: 16 groups
    of 62-63 in stage 1, one stage-2 group of 16 representatives, 16 stage-3 broadcasts. Bytes per peer:
    measured per-round bytes of a member and of a representative, scaled by nothing (an all-reduce sends
    about 2x the vector whatever the group size); time: the one-group all-reduce plus the measured extra
    of the staged runs."""
    one = [r["allreduce_s"] for r in runs if r["target_group_size"] >= peers]
    staged = [r for r in runs if r["target_group_size"] < peers]
    if not one or not staged:
        return {}
    one_s = statistics.median(one)
    extra = statistics.median(r["allreduce_s"] - one_s for r in staged)
    return dict(peers=1000, target_group_size=64, stage1_groups=math.ceil(1000 / 64), stage2_group=math.ceil(1000 / 64),
                stages=3, bytes_member_round=statistics.median(r["bytes_per_peer_round"] for r in staged),
                bytes_rep_round=max(r["bytes_max_peer_round"] for r in staged),
                allreduce_s_one_group=one_s, extra_s_for_stages=extra,
                note="bytes per peer do not grow with the swarm (each all-reduce sends ~2x the vector); the "
                     "stages add one all-reduce for members, two for a group's representative")


def print_table(runs: list[dict], base_ppl: float | None) -> None:
    print(f"{'G':>3} {'one θ/round':>11} {'round s':>8} {'avg s':>6} {'MB/peer/rd':>10} {'MB max':>7} "
          f"{'failed':>6} {'ppl':>8} {'vs 1 grp':>8}")
    for r in runs:
        rel = f"{100 * (r['final_ppl'] / base_ppl - 1):+.1f}%" if base_ppl else "-"
        print(f"{r['target_group_size']:>3} {str(r['one_theta_every_round']):>11} {r['round_s'] or 0:>8.1f} "
              f"{r['allreduce_s']:>6.1f} {r['bytes_per_peer_round'] / 1e6:>10.2f} {r['bytes_max_peer_round'] / 1e6:>7.2f} "
              f"{r['failed_rounds']:>6} {r['final_ppl']:>8.1f} {rel:>8}")


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or ROOT / "runs" / f"bench_groups-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out) if args.out else (workdir / "groups.json" if args.quick else ROOT / "bench/results/groups.json")
    cfg = load_config(None, [*SMALL, f"data.cache_dir={args.cache_dir}"])
    data.prepare(cfg.data, cfg.seed, progress=False)
    runs = []
    for g in args.groups:
        for k in range(args.repeats):
            print(f"[groups] {args.peers} peers, target_group_size {g}, {args.rounds} rounds"
                  + (f", run {k + 1}/{args.repeats}" if args.repeats > 1 else "") + " ...", flush=True)
            runs.append(dict(run_one(args, g, workdir / (f"G{g}" + (f"-{k}" if args.repeats > 1 else ""))), repeat=k))
    by_group = ppl_by_group(runs, args.peers)
    base = by_group.get("one_group_mean")
    for r in runs:
        r["ppl_vs_one_group"] = r["final_ppl"] / base - 1 if base else None
    print_table(runs, base)
    for g, v in by_group["groups"].items():
        print(f"[groups] G {g}: mean ppl {v['mean']:.1f} over {v['runs']} run(s) (spread {100 * v['spread']:.1f} %)"
              + (f", {100 * v['vs_one_group']:+.1f} % vs one group" if v["vs_one_group"] is not None else ""))
    result = dict(command="python scripts/bench_groups.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                  machine=machine_info(), peers=args.peers, rounds=args.rounds, samples_per_round=args.samples,
                  local_steps_per_round=args.local_steps,
                  equal_tokens=len({r["total_samples"] for r in runs}) == 1,
                  repeats=args.repeats, settings=SMALL, runs=runs, ppl_by_group=by_group,
                  projection_1000=projection(runs, args.peers),
                  targets=dict(one_theta_every_round=all(r["one_theta_every_round"] for r in runs),
                               ppl_within_2pct=all(abs(v["vs_one_group"] or 0) <= 0.02
                                                   for v in by_group["groups"].values())),
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"[groups] wrote {out}")
    return 0 if all(c == 0 for r in runs for c in r["exit_codes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
