#!/usr/bin/env python
"""Photon's claims at small scale: centralized vs Photon (FedAvg) vs DiLoCo, IID and non-IID, at equal tokens.

Five runs on the default corpus (the stdlib), one prepared data config, the same model and (up to
the few samples a progress-based round overshoots) the same number of training tokens:

    centralized     one process, batch N x local batch, its own LR from a small sweep (3 LRs, 25% budget)
    photon_iid      N peers on 127.0.0.1, local batch 8, high LR, outer FedAvg (lr 1.0, momentum 0)
    photon_noniid   the same on non-IID silos (whole stdlib top-level modules per peer)
    diloco_iid      N peers, outer Nesterov (lr 0.7, momentum 0.9), inner LR x 2/3 (DiLoCo 4e-4 : Photon 6e-4)
    diloco_noniid   the same on non-IID silos

Every run reports a held-out perplexity curve [tokens, ppl] (the same held-out windows for all),
final perplexity, tokens, wall time, bytes sent per peer, tokens to reach a target perplexity
(1.1 x the worst final perplexity, so every run reaches it), and for the swarms the compute
utilization of each peer and the bytes synchronous data-parallel training would have sent.

    python scripts/experiment_photon.py          # full: ~20 min on 2 free cores; bench/results/photon.*
    python scripts/experiment_photon.py --quick   # smoke: 2 peers, 2 rounds, tiny data; runs/ output
    python scripts/experiment_photon.py --runs centralized photon_iid --tokens 5e5

Tokens of a federated run are the tokens of the local steps that were averaged: the sum over
peers of `tokens` of their successful rounds (each local step is batch x seq_len predicted
tokens); this equals the final global step x batch x seq_len, which is checked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from benchlib import cpu_seconds, machine_info, other_cores, reap_tagged_p2pd, stop_procs  # noqa: E402

from p2p_photon import data  # noqa: E402
from p2p_photon.config import load_config  # noqa: E402
from p2p_photon.files import write_json_atomic  # noqa: E402
from p2p_photon.launch import LocalSwarm  # noqa: E402

RUNS = ("centralized", "photon_iid", "photon_noniid", "diloco_iid", "diloco_noniid", "photon_noniid_overlap")
DEFAULT_RUNS = RUNS[:5]  # photon_noniid_overlap: averaging.overlap = true (the outer step one round late)
TAG_VAR = "P2P_PHOTON_EXPERIMENT_TAG"  # inherited by every process we start, p2pd included
DILOCO_TO_PHOTON_LR = 4e-4 / 6e-4  # DiLoCo's inner AdamW lr : Photon's 125M client lr
TARGET_FACTOR = 1.1

logger = logging.getLogger("experiment_photon")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: 2 peers, 2 rounds of 8 steps, tiny data")
    p.add_argument("--runs", nargs="+", choices=RUNS, default=list(DEFAULT_RUNS),
                   help="which runs (default: the first five; photon_noniid_overlap = overlapped rounds)")
    p.add_argument("--peers", type=int, default=None, help="N peers (default 4; --quick 2)")
    p.add_argument("--model", choices=["nano", "tiny"], default="nano", help="model preset (default nano)")
    p.add_argument("--tokens", type=float, default=None,
                   help="training tokens per run, rounded to whole rounds (default 1.6e6; --quick 3.3e4)")
    p.add_argument("--local-steps", type=int, default=None,
                   help="H: local steps per peer per round; the round's target is N x H x batch samples "
                        "(default 32; --quick 8)")
    p.add_argument("--local-batch", type=int, default=8, help="sequences per local step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--photon-lr", type=float, default=3e-3, help="Photon inner peak LR (default 3e-3)")
    p.add_argument("--diloco-lr", type=float, default=None,
                   help="DiLoCo inner peak LR (default photon-lr x 2/3)")
    p.add_argument("--central-lrs", type=float, nargs="+", default=None,
                   help="centralized LR sweep; one value = no sweep (default: photon-lr x 0.5, 1, 2)")
    p.add_argument("--sweep-fraction", type=float, default=0.25, help="token budget of each sweep run (0.25)")
    p.add_argument("--optimizer", choices=["adamw8bit", "adamw"], default="adamw8bit", help="inner optimizer")
    p.add_argument("--central-threads", type=int, default=None,
                   help="torch threads of the centralized run (default min(N, cores); --quick 1)")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/photon.json; --quick: runs/...)")
    p.add_argument("--png", default=None, help="plot path (default: the JSON path with .png)")
    p.add_argument("--workdir", default=None,
                   help="logs, checkpoints, summaries (default runs/experiment_photon/<time>)")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "p2p_photon"), help="prepared data cache")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds per federated run (900; --quick 240)")
    p.add_argument("--scale", action="store_true",
                   help="issue 17's sweep: sizes x LRs, centralized vs Photon non-IID (bench/results/photon_scale.*; "
                        "with --quick: nano, 2 peers, 2 LRs each, runs/ output); resumes from its JSON")
    p.add_argument("--sizes", nargs="+", default=None, help="--scale: sizes in order (default nano tiny)")
    p.add_argument("--max-extensions", type=int, default=None,
                   help="--scale: LRs a sweep may add past an edge of its grid (default 2; --quick 0)")
    p.add_argument("--no-diloco", action="store_true", help="--scale: skip DiLoCo at the largest size")
    p.add_argument("--fresh", action="store_true", help="--scale: ignore the finished runs in the JSON")
    p.add_argument("--kinds", nargs="+", choices=SCALE_KINDS, default=list(SCALE_KINDS),
                   help="--scale: which sweeps this invocation runs (DiLoCo: the largest size only)")
    p.add_argument("--report-only", action="store_true",
                   help="--scale: train nothing; summarize, plot and list the missing runs from the JSONs")
    p.add_argument("--merge", nargs="+", default=[],
                   help="--scale: also take the finished runs of these JSONs (sizes swept by other invocations)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Every number the five runs share, derived once from the arguments."""

    mode: str
    peers: int
    model: str
    seq_len: int
    batch: int
    local_steps: int
    rounds: int
    photon_lr: float
    diloco_lr: float
    central_lrs: list[float]
    sweep_fraction: float
    optimizer: str
    data: list[str]
    eval_batches_peer: int
    eval_batches_central: int
    warmup_fraction: float = 0.05
    central_threads: int = 1
    run_timeout: float = 900.0
    averaging: list[str] = field(default_factory=list)

    @property
    def samples_per_round(self) -> int:
        return self.peers * self.local_steps * self.batch

    @property
    def tokens(self) -> int:
        return self.rounds * self.samples_per_round * self.seq_len

    @property
    def central_batch(self) -> int:
        return self.peers * self.batch

    @property
    def central_steps(self) -> int:
        return self.rounds * self.local_steps  # = tokens / (central batch x seq_len)

    def central_warmup(self, steps: int) -> int:
        return max(1, round(self.warmup_fraction * steps))


def make_plan(args: argparse.Namespace) -> Plan:
    quick = args.quick
    n = args.peers or (2 if quick else 4)
    h = args.local_steps or (8 if quick else 32)
    tokens = args.tokens or (3.3e4 if quick else 1.6e6)
    rounds = max(1, round(tokens / (n * h * args.local_batch * args.seq_len)))
    k = max(1, round(12 / n))  # held-out windows = 8 N k ~ 96: the same windows for batch 8 and batch 8 N
    data_cfg = ["data.max_corpus_mb=1", "data.vocab_size=1024"] if quick else \
               ["data.max_corpus_mb=4", "data.vocab_size=4096"]
    data_cfg += [f"data.num_silos={n}", f"data.cache_dir={Path(args.cache_dir).resolve()}"]
    photon_lr = args.photon_lr
    diloco_lr = args.diloco_lr or float(f"{photon_lr * DILOCO_TO_PHOTON_LR:.3g}")
    central_lrs = args.central_lrs or [float(f"{photon_lr * f:.3g}") for f in (0.5, 1, 2)]
    averaging = [f"averaging.target_group_size={n}", "averaging.matchmaking_time=2.0",
                 "averaging.allreduce_timeout=30", "averaging.round_timeout=60",
                 "averaging.compression='none'"]  # the algorithms side by side; bench_comm.py measures codecs
    return Plan(mode="quick" if quick else "full", peers=n, model=args.model, seq_len=args.seq_len,
                batch=args.local_batch, local_steps=h, rounds=rounds, photon_lr=photon_lr,
                diloco_lr=diloco_lr,
                central_lrs=central_lrs, sweep_fraction=args.sweep_fraction, optimizer=args.optimizer,
                data=data_cfg, eval_batches_peer=n * k, eval_batches_central=k,
                central_threads=args.central_threads or (1 if quick else max(1, min(n, os.cpu_count() or 1))),
                run_timeout=args.run_timeout or (240.0 if quick else 900.0), averaging=averaging)


def common_overrides(plan: Plan, split: str) -> list[str]:
    return [*plan.data, f"data.split={split}", f"model.preset={plan.model}", f"model.seq_len={plan.seq_len}",
            f"inner.optimizer={plan.optimizer}", "logging.progress_bar=false", "checkpoint.every_rounds=0"]


def peer_overrides(plan: Plan, preset: str, split: str, lr: float) -> list[str]:
    """One federated run: the LR schedule runs on the global step (the swarm's summed local steps)."""
    total = plan.rounds * plan.peers * plan.local_steps
    return [*common_overrides(plan, split), f"inner.lr={lr}", f"inner.batch_size={plan.batch}",
            f"inner.total_steps={total}",
            f"inner.warmup_steps={plan.peers * plan.central_warmup(plan.central_steps)}",
            f"outer.preset={preset}", f"rounds.target_samples_per_round={plan.samples_per_round}",
            f"rounds.num_rounds={plan.rounds}", f"logging.eval_batches={plan.eval_batches_peer}",
            "logging.progress_interval=1.0", "dht.startup_timeout=90", *plan.averaging]


def central_overrides(plan: Plan, lr: float, steps: int) -> list[str]:
    return [*common_overrides(plan, "iid"), f"inner.lr={lr}", f"inner.batch_size={plan.central_batch}",
            f"inner.total_steps={steps}", f"inner.warmup_steps={plan.central_warmup(steps)}",
            f"logging.eval_batches={plan.eval_batches_central}"]


# ----------------------------------------------------------------------------- centralized


def run_centralized(plan: Plan, lr: float, steps: int, eval_every: int) -> dict:
    """One process on the union of the silos, batch N x local batch."""
    import torch

    from p2p_photon.baseline import train_centralized

    torch.set_num_threads(plan.central_threads)
    cfg = load_config(None, central_overrides(plan, lr, steps))
    res = train_centralized(cfg, steps=steps, eval_every=eval_every)
    return dict(final_ppl=res.final_ppl, initial_ppl=res.initial_ppl, tokens=res.tokens, wall_s=res.wall_s,
                steps=res.steps, lr=lr, batch=plan.central_batch, threads=plan.central_threads,
                bytes_sent_per_peer=0, curve=[[int(t), float(p)] for t, p in res.curve], rounds=None,
                utilization=None)


def centralized(plan: Plan) -> dict:
    """LR sweep on a short budget (each with its own full cosine schedule), then the full run at the
    best LR."""
    sweep = []
    if len(plan.central_lrs) > 1:
        steps = max(2, round(plan.sweep_fraction * plan.central_steps))
        for lr in plan.central_lrs:
            r = run_centralized(plan, lr, steps, eval_every=0)
            sweep.append(dict(lr=lr, steps=steps, tokens=r["tokens"], final_ppl=r["final_ppl"],
                              wall_s=r["wall_s"]))
            print(f"[experiment] centralized LR sweep: lr {lr:.2e} -> ppl {r['final_ppl']:.2f} "
                  f"({r['tokens']} tokens, {r['wall_s']:.0f}s)", flush=True)
    best = min(sweep, key=lambda s: s["final_ppl"])["lr"] if sweep else plan.central_lrs[0]
    run = run_centralized(plan, best, plan.central_steps, eval_every=plan.local_steps)
    at_edge = len(sweep) > 2 and best in (min(plan.central_lrs), max(plan.central_lrs))
    return dict(run, lr_sweep=sweep, lr_sweep_best_at_edge=at_edge)


# ----------------------------------------------------------------------------- federated


def run_federated(swarm: LocalSwarm, plan: Plan, name: str, lr: float | None = None) -> dict:
    """N peer processes of one run (its own run_id) on the shared bootstrap; only peer 0 evaluates every
    round. `lr`: the inner peak LR (default: the plan's Photon or DiLoCo LR)."""
    preset, split, *mode = name.split("_")
    lr = lr or (plan.photon_lr if preset == "photon" else plan.diloco_lr)
    run_id = f"exp-{preset}-{split}-{uuid.uuid4().hex[:6]}"
    overrides = [*peer_overrides(plan, preset, split, lr), f"dht.run_id={run_id}",
                 f"averaging.overlap={'true' if 'overlap' in mode else 'false'}"]
    t0 = time.perf_counter()
    procs = [swarm.start_peer(i, name=f"{name}-peer{i}",
                              overrides=[*overrides, f"logging.eval_every_rounds={1 if i == 0 else 0}"])
             for i in range(plan.peers)]
    try:
        codes = swarm.wait(procs, timeout=plan.run_timeout)
    except TimeoutError:
        stop_procs(swarm, procs)
        raise
    if any(codes):
        raise RuntimeError(f"{name}: peer exit codes {codes}\n" + "\n".join(swarm.tail(p, 15) for p in procs))
    summaries = [swarm.summary(p.name) for p in procs]
    out = summarize_federated(summaries, plan)
    return dict(out, lr=lr, outer=preset, split=split, overlap="overlap" in mode, run_id=run_id,
                process_wall_s=time.perf_counter() - t0)


def averaged_tokens(summaries: list[dict]) -> dict[int, int]:
    """round -> tokens of the local steps averaged in it (sum over the peers' successful rounds)."""
    per_round: dict[int, int] = defaultdict(int)
    for s in summaries:
        for h in s["history"]:
            if h.get("ok"):
                per_round[h["round"]] += int(h["tokens"])
    return dict(per_round)


def federated_curve(s0: dict, per_round: dict[int, int]) -> list[list[float]]:
    """[tokens averaged so far, held-out ppl of the global model after that round], from peer 0's
    evaluations."""
    cum, total = {}, 0
    for r in sorted(per_round):
        total += per_round[r]
        cum[r] = total
    curve = [[0, s0["initial_ppl"]]]
    for h in s0["history"]:
        if h.get("ok") and h.get("eval_loss") is not None:
            curve.append([cum[h["round"]], math.exp(min(h["eval_loss"], 50.0))])
    if curve[-1][0] != total:
        curve.append([total, s0["final_ppl"]])
    return curve


def peer_timing(s: dict) -> dict:
    """Compute utilization of one peer: training-step time over round time (and over all time between
    rounds)."""
    rounds = [h for h in s["history"] if "wall_s" in h]
    ok = [h for h in rounds if h["ok"]]
    train = sum(h["train_s"] for h in ok)
    in_rounds = sum(h["wall_s"] + h["allreduce_s"] for h in ok)
    start = rounds[0]["time"] - rounds[0]["wall_s"] - rounds[0]["allreduce_s"] if rounds else 0.0
    span = rounds[-1]["time"] - start if rounds else 0.0
    return dict(utilization=train / in_rounds if in_rounds else 0.0,
                utilization_wall=train / span if span else 0.0,
                allreduce_s_mean=sum(h["allreduce_s"] for h in ok) / max(1, len(ok)),
                train_s=train, round_s=in_rounds, span_s=span, start=start,
                end=rounds[-1]["time"] if rounds else 0.0,
                ok_rounds=len(ok), failed_rounds=s["failed_rounds"], bytes_sent=s["bytes_sent"],
                steps=sum(h["steps"] for h in ok))


def summarize_federated(summaries: list[dict], plan: Plan) -> dict:
    s0 = summaries[0]
    per_round = averaged_tokens(summaries)
    tokens = sum(per_round.values())
    timing = [peer_timing(s) for s in summaries]
    wall = max(t["end"] for t in timing) - min(t["start"] for t in timing)
    mean = lambda key: sum(t[key] for t in timing) / len(timing)  # noqa: E731
    return dict(
        final_ppl=s0["final_ppl"], initial_ppl=s0["initial_ppl"], tokens=tokens,
        tokens_check=s0["global_step"] * plan.batch * plan.seq_len, wall_s=wall,
        bytes_sent_per_peer=mean("bytes_sent"), rounds=s0["rounds"], global_step=s0["global_step"],
        curve=federated_curve(s0, per_round), utilization=mean("utilization"),
        utilization_wall=mean("utilization_wall"), allreduce_s_mean=mean("allreduce_s_mean"),
        theta_identical=len({s["theta"] for s in summaries}) == 1,
        failed_rounds=sum(t["failed_rounds"] for t in timing),
        peers=[{k: v for k, v in t.items() if k not in ("start", "end")} for t in timing],
        tokens_per_round={str(r): t for r, t in sorted(per_round.items())})


# ----------------------------------------------------------------------------- derived figures


def ppl_at(curve: list[list[float]], tokens: float) -> float | None:
    """Held-out perplexity after `tokens`, interpolated linearly in log-ppl (None beyond the curve)."""
    for (t0, p0), (t1, p1) in zip(curve, curve[1:]):
        if t0 <= tokens <= t1:
            frac = (tokens - t0) / (t1 - t0) if t1 > t0 else 1.0
            return math.exp(math.log(p0) + frac * (math.log(p1) - math.log(p0)))
    return None


def tokens_to_reach(curve: list[list[float]], target: float) -> float | None:
    """First crossing of `target`, interpolated linearly in log-ppl between evaluations."""
    for i, (t, p) in enumerate(curve):
        if p <= target:
            if i == 0:
                return float(t)
            t0, p0 = curve[i - 1]
            frac = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p))
            return float(t0 + frac * (t - t0))
    return None


def ddp_bytes(tokens: float, plan: Plan, params: int) -> float:
    """Bytes per peer of synchronous data-parallel training for the same tokens: a ring all-reduce of fp32
    gradients, 2 (N-1)/N x 4 P bytes per step, tokens / (N x local batch x seq_len) steps."""
    steps = tokens / (plan.peers * plan.batch * plan.seq_len)
    return steps * 2 * (plan.peers - 1) / plan.peers * 4 * params


def add_derived(runs: dict[str, dict], plan: Plan, params: int) -> float | None:
    """Target perplexity, tokens to reach it, and the data-parallel comparison; returns the target."""
    ok = {k: r for k, r in runs.items() if "error" not in r}
    if not ok:
        return None
    target = TARGET_FACTOR * max(r["final_ppl"] for r in ok.values())
    for name, r in ok.items():
        r["tokens_to_target"] = tokens_to_reach(r["curve"], target)
        r["ppl_at_budget"] = ppl_at(r["curve"], plan.tokens)
        r["tokens_per_s"] = r["tokens"] / r["wall_s"] if r["wall_s"] else None
        if name != "centralized":
            r["ddp_bytes_per_peer"] = ddp_bytes(r["tokens"], plan, params)
            sent = r["bytes_sent_per_peer"]
            r["comm_reduction"] = r["ddp_bytes_per_peer"] / sent if sent else None
    return target


def count_params(plan: Plan) -> int:
    from p2p_photon.model import build_model
    from p2p_photon.model import count_params as count

    vocab = int(next(s for s in plan.data if s.startswith("data.vocab_size=")).split("=")[1])
    return count(build_model(plan.model, vocab, plan.seq_len, 0, "meta"))


# ----------------------------------------------------------------------------- output


def print_table(runs: dict[str, dict], target: float | None) -> None:
    head = (f"{'run':<14} {'final ppl':>9} {'ppl@budget':>10} {'tokens':>9} {'tok->target':>11} "
            f"{'wall s':>7} {'rounds':>6} {'MB/peer':>8} {'DDP MB':>8} {'x less':>7} {'util':>5} "
            f"{'util*':>5} {'avg s':>6}")
    print(f"\nheld-out perplexity target {target:.2f} (= {TARGET_FACTOR} x the worst final ppl)"
          if target else "")
    print(head)
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:<14} FAILED: {r['error'].splitlines()[0]}")
            continue
        print(f"{name:<14} {r['final_ppl']:>9.2f} {fmt(r.get('ppl_at_budget'), '10.2f')} {r['tokens']:>9d} "
              f"{fmt(r.get('tokens_to_target'), '11.0f')} {r['wall_s']:>7.1f} {fmt(r['rounds'], '6d')} "
              f"{r['bytes_sent_per_peer'] / 1e6:>8.2f} "
              f"{fmt(r.get('ddp_bytes_per_peer') and r['ddp_bytes_per_peer'] / 1e6, '8.1f')} "
              f"{fmt(r.get('comm_reduction'), '7.1f')} {fmt(r['utilization'], '5.2f')} "
              f"{fmt(r.get('utilization_wall'), '5.2f')} {fmt(r.get('allreduce_s_mean'), '6.2f')}")
    print("ppl@budget = held-out ppl interpolated at the planned tokens per run (progress-based rounds "
          "overshoot a little); util = training-step time / (round training wall + averaging); util* = the "
          "same over all the time between the start of round 0 and the end of the last round (evaluation, "
          "logging, failed rounds too); "
          "avg s = mean averaging time per round\n", flush=True)


def plot(runs: dict[str, dict], target: float | None, budget: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"centralized": ("k", "-"), "photon_iid": ("tab:blue", "-"), "photon_noniid": ("tab:blue", "--"),
              "diloco_iid": ("tab:orange", "-"), "diloco_noniid": ("tab:orange", "--"),
              "photon_noniid_overlap": ("tab:green", ":")}
    for name, r in runs.items():
        if "error" in r:
            continue
        color, ls = styles.get(name, (None, "-"))
        t, p = zip(*r["curve"])
        ax.plot(t, p, ls, color=color, marker=".", label=f"{name} (final {r['final_ppl']:.1f})")
    if target:
        ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target:.1f}")
    ax.axvline(budget, color="grey", lw=0.8, ls="-.", label=f"budget {budget} tokens")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (all peers)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)




def config_record(plan: Plan, params: int) -> dict:
    return dict(
        asdict(plan), params=params, samples_per_round=plan.samples_per_round, tokens_per_run=plan.tokens,
        central_batch=plan.central_batch, central_steps=plan.central_steps,
        peer_overrides_photon_iid=peer_overrides(plan, "photon", "iid", plan.photon_lr),
        lr_choice=("defaults (see the numbers above for this run) - photon: the project's Photon-recipe "
                   "CPU peer LR (peers/cpu_peer.toml), not tuned; "
                   "diloco: photon x 2/3, the ratio of DiLoCo's inner lr 4e-4 to Photon's 125M client "
                   "lr 6e-4; centralized: best final ppl of a sweep of photon x 0.5/1/2 on sweep_fraction "
                   "of the tokens, each with its own warmup + cosine schedule"),
        token_counting=("federated tokens = sum over peers of `tokens` of their successful (averaged) "
                        "rounds, = final global step x batch x seq_len (tokens_check); a curve point after "
                        "round r counts the tokens averaged in rounds <= r; centralized tokens = steps x N x "
                        "batch x seq_len"),
        wall_counting=("federated wall_s: from the earliest peer's start of round 0 to the latest peer's "
                       "end of the last round (process start-up and the final checkpoint excluded: "
                       "process_wall_s has them); centralized wall_s: the training loop incl. its "
                       "evaluations"),
        eval=("the same held-out windows for every run: 8 N k windows of seq_len+1 tokens "
              f"({plan.eval_batches_peer} batches of {plan.batch} for peers, {plan.eval_batches_central} of "
              f"{plan.central_batch} centralized); only peer 0 evaluates every round"),
        schedule=("warmup + cosine on the global step; federated: total = rounds x N x H global steps, "
                  "warmup = N x the centralized warmup (same tokens)"),
        bytes_note=("bytes_sent_per_peer: bytes our all-reduce put on the wire (protobuf payloads, "
                    "measured), summed over successful rounds; uncompressed here, ~2 (n-1)/n x 4 P per "
                    "round"))




# ----------------------------------------------------------------------------- processes






# ----------------------------------------------------------------------------- scale: sizes x learning rates


@dataclass(frozen=True)
class SizeSpec:
    """One size of the scale sweep (issue 17): tokens per run, H, peer batch, and the LR grids each sweep
    starts from (the centralized batch is N x the peer batch)."""

    tokens: float
    local_steps: int
    central_lrs: tuple[float, ...]
    photon_lrs: tuple[float, ...]
    local_batch: int = 4
    run_timeout: float = 1800.0
    allreduce_timeout: float = 30.0


# Token budgets sized for a two-hour slot on the shared 2-core CPU machine, run at nice 19 while other programs
# kept ~2 cores busy (load average 10-29): a 524k-token nano centralized run took 330 s there (35 s on a free
# machine), a 4-peer swarm spent ~5 min just starting, and a tiny run got ~0.06 core; tiny costs ~25x nano per
# token, small ~100x (small does not fit). Every run of a size gets the same tokens; the grids
# are x2 apart, the same for both sweeps, and a sweep extends past an edge by itself (max_extensions).
SCALE_SIZES = {
    "nano": SizeSpec(1.31e5, 16, (3e-3, 6e-3, 1.2e-2, 2.4e-2), (3e-3, 6e-3, 1.2e-2, 2.4e-2)),
    "tiny": SizeSpec(2.46e4, 4, (4e-3, 8e-3, 2e-3, 1.6e-2), (4e-3, 8e-3, 2e-3, 1.6e-2), 4, 3000.0, 90.0),
    "small": SizeSpec(2.5e4, 4, (5e-4, 1e-3, 2e-3, 4e-3), (5e-4, 1e-3, 2e-3, 4e-3), 4, 3600.0, 120.0),
}
QUICK_SCALE = {"nano": SizeSpec(3.3e4, 8, (3e-3, 1.2e-2), (1.2e-2,), 8, 240.0)}  # smoke: one swarm run
SCALE_KINDS = ("central", "photon_noniid", "diloco_noniid")
SCALE_TARGET_FACTOR = 1.1  # target ppl of a size = 1.1 x the worse of its best centralized and best Photon


def size_plan(args: argparse.Namespace, size: str, spec: SizeSpec) -> Plan:
    """The shared numbers of one size: make_plan with the size's model, tokens, H and timeouts."""
    a = argparse.Namespace(**{**vars(args), "model": size, "tokens": spec.tokens, "local_steps": spec.local_steps,
                              "local_batch": spec.local_batch, "central_lrs": [spec.central_lrs[0]],
                              "run_timeout": spec.run_timeout})
    plan = make_plan(a)
    plan.averaging = [f"averaging.allreduce_timeout={spec.allreduce_timeout:g}"
                      if o.startswith("averaging.allreduce_timeout=") else o for o in plan.averaging]
    return plan


def run_key(size: str, kind: str, lr: float) -> str:
    return f"{size}/{kind}/{lr:g}"


def score(run: dict | None) -> float:
    """What a sweep minimizes: held-out ppl at the planned tokens (inf for a failed or diverged run)."""
    if not run or "error" in run:
        return math.inf
    p = run.get("ppl_at_budget") or run.get("final_ppl")
    return p if p is not None and math.isfinite(p) else math.inf


def edge_extension(scores: dict[float, float], grid: tuple[float, ...], max_extensions: int) -> float | None:
    """The next LR when the best score sits at an edge of the LRs run so far (x2 above, /2 below); None when
    it is inside, or when `max_extensions` LRs beyond the grid were already added."""
    if not scores or len(set(scores) - set(grid)) >= max_extensions:
        return None
    lrs = sorted(scores)
    best = min(lrs, key=lambda lr: scores[lr])  # ties and all-inf: the lowest LR
    if len(lrs) > 1 and best == lrs[-1] and math.isfinite(scores[best]):
        return float(f"{best * 2:.3g}")
    if len(lrs) > 1 and best == lrs[0]:
        return float(f"{best / 2:.3g}")
    return None


def lr_sweep(grid: tuple[float, ...], done: dict[float, dict], run_one, max_extensions: int) -> dict[float, dict]:
    """Run every LR of `grid` not in `done` (LR -> result), then extend past an edge while the best sits there."""
    for lr in grid:
        if lr not in done:
            done[lr] = run_one(lr)
    while (lr := edge_extension({k: score(v) for k, v in done.items()}, grid, max_extensions)) is not None:
        done[lr] = run_one(lr)
    return done


def best_lr(done: dict[float, dict]) -> float | None:
    ok = {lr: score(r) for lr, r in done.items() if math.isfinite(score(r))}
    return min(sorted(ok), key=ok.get) if ok else None


def runs_of(runs: dict[str, dict], size: str, kind: str) -> dict[float, dict]:
    """LR -> result of one size and kind, from the flat `size/kind/lr` table."""
    out = {}
    for key, r in runs.items():
        s, k, lr = key.split("/")
        if s == size and k == kind:
            out[float(lr)] = r
    return dict(sorted(out.items()))


def with_figures(run: dict, plan: Plan) -> dict:
    if "error" not in run:
        run["ppl_at_budget"] = ppl_at(run["curve"], plan.tokens)
        run["tokens_per_s"] = run["tokens"] / run["wall_s"] if run["wall_s"] else None
    return run


def robustness(done: dict[float, dict]) -> dict:
    """Final ppl (at the planned tokens) vs LR, and the LRs within 10% of the best."""
    curve = [[lr, score(r) if math.isfinite(score(r)) else None] for lr, r in sorted(done.items())]
    best = min((p for _, p in curve if p is not None), default=None)
    near = [lr for lr, p in curve if p is not None and best is not None and p <= 1.1 * best]
    return dict(curve=curve, lrs_within_10pct=near, best_at_edge=bool(curve) and best_lr(done) in
                (curve[0][0], curve[-1][0]) and len(curve) > 1)


def best_record(done: dict[float, dict], target: float | None) -> dict | None:
    lr = best_lr(done)
    if lr is None:
        return None
    r = done[lr]
    return dict(lr=lr, ppl_at_budget=score(r), final_ppl=r["final_ppl"], tokens=r["tokens"], wall_s=r["wall_s"],
                tokens_to_target=tokens_to_reach(r["curve"], target) if target else None, curve=r["curve"],
                theta_identical=r.get("theta_identical"), failed_rounds=r.get("failed_rounds"))


def summarize_size(size: str, plan: Plan, params: int, runs: dict[str, dict]) -> dict:
    """Per size: best centralized vs best Photon at equal tokens (ratio), tokens to a target, LR curves."""
    central, photon = runs_of(runs, size, "central"), runs_of(runs, size, "photon_noniid")
    diloco = runs_of(runs, size, "diloco_noniid")
    bests = [score(d[best_lr(d)]) for d in (central, photon) if best_lr(d) is not None]
    target = SCALE_TARGET_FACTOR * max(bests) if len(bests) == 2 else None
    out = dict(params=params, tokens_per_run=plan.tokens, local_steps=plan.local_steps, rounds=plan.rounds,
               central_batch=plan.central_batch, peer_batch=plan.batch, peers=plan.peers, target_ppl=target,
               best_central=best_record(central, target), best_photon=best_record(photon, target),
               best_diloco=best_record(diloco, target),
               robustness={k: robustness(d) for k, d in (("central", central), ("photon_noniid", photon),
                                                         ("diloco_noniid", diloco)) if d})
    c, p = out["best_central"], out["best_photon"]
    out["ratio_photon_to_central"] = p["ppl_at_budget"] / c["ppl_at_budget"] if c and p else None
    return out


def scale_verdict(summary: dict[str, dict]) -> dict:
    """Does Photon's ppl ratio to centralized shrink from each size to the next?"""
    ratios = [(s, v["ratio_photon_to_central"]) for s, v in summary.items() if v.get("ratio_photon_to_central")]
    steps = [b < a for (_, a), (_, b) in zip(ratios, ratios[1:])]
    return dict(ratios={s: r for s, r in ratios}, shrinks=all(steps) if steps else None)


def plot_scale(summary: dict[str, dict], runs: dict[str, dict], path: Path, title: str) -> None:
    """Left: ppl at the planned tokens vs LR (both sweeps, every size). Then one panel per size: the
    held-out curves of the best centralized, best Photon (and DiLoCo) runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(summary)
    fig, axes = plt.subplots(1, 1 + len(sizes), figsize=(5.5 * (1 + len(sizes)), 4.8), squeeze=False)
    ax = axes[0][0]
    colors = dict(zip(sizes, ("tab:blue", "tab:red", "tab:green", "tab:purple")))
    styles = {"central": ("k", "-", "o"), "photon_noniid": (None, "--", "s"), "diloco_noniid": (None, ":", "*")}
    for size, v in summary.items():
        for kind, rb in v["robustness"].items():
            pts = [(lr, p) for lr, p in rb["curve"] if p is not None]
            if pts:
                _, ls, m = styles[kind]
                ax.plot(*zip(*pts), ls, marker=m, color=colors[size], label=f"{size} {kind}")
    ax.set(xscale="log", yscale="log", xlabel="peak LR (centralized / Photon inner)",
           ylabel="held-out ppl at the planned tokens", title="LR robustness")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    for ax, (size, v) in zip(axes[0][1:], summary.items()):
        for name, rec, color in (("centralized", v["best_central"], "k"), ("photon", v["best_photon"], "tab:blue"),
                                 ("diloco", v["best_diloco"], "tab:orange")):
            if rec:
                ax.plot(*zip(*rec["curve"]), "-", marker=".", color=color,
                        label=f"{name} lr {rec['lr']:g} ({rec['ppl_at_budget']:.1f})")
        if v["target_ppl"]:
            ax.axhline(v["target_ppl"], color="grey", lw=0.8, ls=":", label=f"target {v['target_ppl']:.1f}")
        ratio = v["ratio_photon_to_central"]
        ax.set(yscale="log", xlabel="training tokens (all peers)", ylabel="held-out ppl",
               title=f"{size} ({v['params'] / 1e6:.2f}M) photon/central {ratio:.2f}" if ratio else size)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_scale_table(summary: dict[str, dict]) -> None:
    print(f"\n{'size':<6} {'params':>7} {'tokens':>8} {'central lr':>10} {'ppl':>7} {'photon lr':>9} {'ppl':>7} "
          f"{'ratio':>6} {'tok->target c/p':>17} {'diloco':>7}")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for size, v in summary.items():
        c, p, d = v["best_central"] or {}, v["best_photon"] or {}, v["best_diloco"] or {}
        print(f"{size:<6} {v['params'] / 1e6:>6.2f}M {v['tokens_per_run']:>8d} {fmt(c.get('lr'), '10.2g')} "
              f"{fmt(c.get('ppl_at_budget'), '7.1f')} {fmt(p.get('lr'), '9.2g')} {fmt(p.get('ppl_at_budget'), '7.1f')} "
              f"{fmt(v['ratio_photon_to_central'], '6.2f')} "
              f"{fmt(c.get('tokens_to_target'), '8.0f')}/{fmt(p.get('tokens_to_target'), '<8.0f')} "
              f"{fmt(d.get('ppl_at_budget'), '7.1f')}")
    print(flush=True)


class ScaleRunner:
    """Runs (size, kind, LR) one at a time, saving the JSON after each; a finished run is never repeated."""

    def __init__(self, result: dict, save, workdir: Path):
        self.result, self.save, self.workdir = result, save, workdir
        self.stack = contextlib.ExitStack()
        self.swarm: LocalSwarm | None = None

    def run(self, size: str, plan: Plan, kind: str, lr: float) -> dict:
        key = run_key(size, kind, lr)
        runs = self.result["runs"]
        if key in runs and "error" not in runs[key]:
            return runs[key]
        print(f"[experiment] {key} ...", flush=True)
        before, t0 = cpu_seconds(), time.perf_counter()
        try:
            r = self._train(plan, kind, lr)
        except Exception as e:  # recorded (and retried on a restart); the sweep goes on
            logger.error("%s failed: %s", key, e)
            r = dict(error=f"{type(e).__name__}: {e}")
        r.update(other_cores=other_cores(before, cpu_seconds()), total_s=time.perf_counter() - t0,
                 finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        runs[key] = with_figures(r, plan)
        self.save()
        print(f"[experiment] {key}: ppl@budget {score(r):.2f}, {r.get('tokens')} tokens, "
              f"{r['total_s']:.0f}s, other programs {r['other_cores']:.2f} cores", flush=True)
        return r

    def _train(self, plan: Plan, kind: str, lr: float) -> dict:
        if kind == "central":
            return run_centralized(plan, lr, plan.central_steps, eval_every=plan.local_steps)
        if self.swarm is None:  # one bootstrap for every federated run, set once it is up
            swarm = self.stack.enter_context(LocalSwarm(self.workdir, threads_per_peer=1))
            swarm.start_bootstrap()
            self.swarm = swarm
        return run_federated(self.swarm, plan, kind, lr)

    def close(self) -> None:
        self.stack.close()


def scale_size(runner: ScaleRunner, size: str, spec: SizeSpec, plan: Plan, kinds: tuple[str, ...],
               max_extensions: int) -> None:
    """The LR sweeps of one size (the grids interleaved, so that sweeps cut short still have both sides),
    then DiLoCo at the best Photon inner LR when asked; `kinds` lets separate invocations share a size."""
    grids = [(k, g) for k, g in (("central", spec.central_lrs), ("photon_noniid", spec.photon_lrs)) if k in kinds]
    for i in range(max(len(g) for _, g in grids) if grids else 0):
        for kind, grid in grids:
            if i < len(grid):
                runner.run(size, plan, kind, grid[i])
    for kind, grid in grids:
        done = runs_of(runner.result["runs"], size, kind)
        lr_sweep(grid, done, lambda lr, kind=kind: runner.run(size, plan, kind, lr), max_extensions)
    best = best_lr(runs_of(runner.result["runs"], size, "photon_noniid"))
    if "diloco_noniid" in kinds and best is not None:
        runner.run(size, plan, "diloco_noniid", best)


def planned_keys(size: str, spec: SizeSpec, runs: dict[str, dict], diloco: bool) -> list[str]:
    """The runs a size's sweep needs before any extension: both grids, and DiLoCo at Photon's best LR."""
    keys = [run_key(size, k, lr) for k, grid in (("central", spec.central_lrs), ("photon_noniid", spec.photon_lrs))
            for lr in grid]
    best = best_lr(runs_of(runs, size, "photon_noniid"))
    return keys + ([run_key(size, "diloco_noniid", best if best is not None else math.nan)] if diloco else [])


def load_previous(out: Path, plans: dict[str, dict]) -> dict[str, dict]:
    """Finished runs of an earlier invocation whose size was planned exactly as now (resume, or --merge)."""
    if not out.exists():
        return {}
    old = json.loads(out.read_text())
    same = {s for s, p in old.get("sizes", {}).items() if plans.get(s) == p}
    keep = {k: r for k, r in old.get("runs", {}).items() if k.split("/")[0] in same and "error" not in r}
    print(f"[experiment] resuming {out}: {len(keep)} finished runs of {sorted(same) or 'no size'} kept", flush=True)
    return keep


def previous_runs(paths: list[Path], plans: dict[str, dict]) -> dict[str, dict]:
    """load_previous over the output and the --merge files (sizes swept by separate invocations)."""
    runs: dict[str, dict] = {}
    for path in paths:
        runs.update(load_previous(path, plans))
    return runs


def main_scale(args: argparse.Namespace) -> int:
    specs = QUICK_SCALE if args.quick else SCALE_SIZES
    sizes = args.sizes or (list(specs) if args.quick else ["nano", "tiny"])
    unknown = [s for s in sizes if s not in specs]
    if unknown:
        raise SystemExit(f"no scale spec for {unknown} (have {list(specs)})")
    out = Path(args.out) if args.out else (ROOT / "runs" / "experiment_photon" / "quick" / "photon_scale.json"
                                           if args.quick else ROOT / "bench" / "results" / "photon_scale.json")
    png = Path(args.png) if args.png else out.with_suffix(".png")
    # absolute: LocalSwarm runs its processes in the workdir and hands them paths under it
    workdir = Path(args.workdir).resolve() if args.workdir else ROOT / "runs" / "experiment_photon" / time.strftime(
        "scale-%Y%m%d-%H%M%S")
    tag = os.environ.setdefault(TAG_VAR, uuid.uuid4().hex)
    max_ext = args.max_extensions if args.max_extensions is not None else (0 if args.quick else 2)
    plans = {s: size_plan(args, s, specs[s]) for s in sizes}
    plan_records = {s: json.loads(json.dumps(asdict(p))) for s, p in plans.items()}
    for p in plans.values():
        prepare_data(p)
    params = {s: count_params(p) for s, p in plans.items()}
    given = sys.argv[1:] if args.argv is None else args.argv
    result = dict(mode=f"scale-{'quick' if args.quick else 'full'}", command=shlex.join(
                      ["python", "scripts/experiment_photon.py", *given]),
                  sizes=plan_records, specs={s: asdict(specs[s]) for s in sizes}, max_extensions=max_ext,
                  machine=machine_info(),
                  runs={} if args.fresh else previous_runs([*map(Path, args.merge), out], plan_records),
                  complete=False, notes=SCALE_NOTES)
    t0 = time.perf_counter()

    def save() -> None:
        result["summary"] = {s: summarize_size(s, plans[s], params[s], result["runs"]) for s in sizes}
        result["verdict"] = scale_verdict(result["summary"])
        write_json_atomic(out, result)

    for s, p in plans.items():
        print(f"[experiment] {s}: {params[s] / 1e6:.2f}M params, {p.rounds} rounds x H={p.local_steps} x "
              f"{p.peers} peers x batch {p.batch} x seq {p.seq_len} = {p.tokens} tokens per run", flush=True)
    runner = ScaleRunner(result, save, workdir)
    try:
        for s in sizes if not args.report_only else ():
            kinds = tuple(k for k in args.kinds if k != "diloco_noniid" or (s == sizes[-1] and not args.no_diloco))
            scale_size(runner, s, specs[s], plans[s], kinds, max_extensions=max_ext)
    finally:
        runner.close()
    leaked = reap_tagged_p2pd(TAG_VAR, tag)
    failed = [k for k, r in result["runs"].items() if "error" in r]
    missing = [k for s in sizes for k in planned_keys(s, specs[s], result["runs"], s == sizes[-1] and not args.no_diloco)
               if k not in result["runs"]]
    result.update(complete=not failed and not missing, failed_runs=failed, missing_runs=missing, p2pd_leaked=leaked,
                  wall_s_this_invocation=time.perf_counter() - t0, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    save()
    plot_scale(result["summary"], result["runs"], png,
               f"Photon (non-IID, {plans[sizes[0]].peers} peers) vs centralized at equal tokens, per size")
    print_scale_table(result["summary"])
    print(f"[experiment] wrote {out} and {png}; verdict {result['verdict']}; leaked p2pd: {leaked or 'none'}")
    return 1 if leaked or failed else 0


SCALE_NOTES = dict(
    design=("per size: centralized runs (batch = N x local batch, IID union of the silos) at every LR of its "
            "grid, Photon runs (N peers, non-IID silos, FedAvg lr 1.0) at every inner LR of its grid, each "
            "run with its own warmup + cosine schedule over the same tokens; a sweep whose best LR sits at an "
            "edge adds LRs beyond it (x2 or /2, up to max_extensions); DiLoCo (Nesterov 0.7/0.9) runs once, "
            "for the largest size, at Photon's best inner LR (not swept)"),
    score=("ppl_at_budget: held-out ppl interpolated (log-linear) at the planned tokens per run; the best LR "
           "of a sweep is the one with the lowest; federated runs overshoot the budget by a few samples"),
    target=("per size: 1.1 x the worse of the best centralized and best Photon ppl at the budget; "
            "tokens_to_target of each best run from its held-out curve"),
    federated_quality=("a federated run's curve and final ppl are peer 0's evaluations of its global model; "
                       "theta_identical false or failed_rounds > 0 mean the peers did not all end on one model "
                       "or missed rounds (then tokens != tokens_check): such a run is reported, not cleaned"),
    contention=("other_cores per run: cores other programs kept busy during it (a shared 2-core machine); "
                "wall times are only comparable between runs with similar other_cores"),
)


# ----------------------------------------------------------------------------- main


def prepare_data(plan: Plan) -> None:
    for split in ("iid", "noniid"):
        cfg = load_config(None, common_overrides(plan, split))
        data.prepare(cfg.data, cfg.seed, progress=False)


def run_all(plan: Plan, names: list[str], workdir: Path, save) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    if "centralized" in names:
        runs["centralized"] = attempt("centralized", lambda: centralized(plan))
        save(runs)
    fed = [n for n in names if n != "centralized"]
    if not fed:
        return runs
    with LocalSwarm(workdir, threads_per_peer=1) as swarm:
        swarm.start_bootstrap()
        for name in fed:
            runs[name] = attempt(name, lambda name=name: run_federated(swarm, plan, name))
            save(runs)
    return runs


def attempt(name: str, fn) -> dict:
    print(f"[experiment] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        r = fn()
    except Exception as e:  # a failed run is recorded and reported, the others still run
        logger.error("%s failed: %s", name, e)
        return dict(error=f"{type(e).__name__}: {e}")
    print(f"[experiment] {name}: final ppl {r['final_ppl']:.2f}, {r['tokens']} tokens, "
          f"{r['wall_s']:.0f}s training ({time.perf_counter() - t0:.0f}s in all)", flush=True)
    return r


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    if args.scale:
        return main_scale(args)
    plan = make_plan(args)
    quick_out = ROOT / "runs" / "experiment_photon" / "quick" / "photon.json"
    full_out = ROOT / "bench" / "results" / "photon.json"
    out = Path(args.out) if args.out else (quick_out if args.quick else full_out)
    png = Path(args.png) if args.png else out.with_suffix(".png")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.workdir).resolve() if args.workdir else ROOT / "runs" / "experiment_photon" / stamp
    tag = os.environ.setdefault(TAG_VAR, uuid.uuid4().hex)
    t_start, load_before = time.perf_counter(), os.getloadavg()
    print(f"[experiment] {plan.mode}: {plan.peers} peers, {plan.model}, "
          f"{plan.rounds} rounds x {plan.local_steps} local steps x batch {plan.batch} x seq {plan.seq_len} "
          f"= {plan.tokens} tokens per run; load avg "
          f"{load_before[0]:.2f}; logs in {workdir}", flush=True)
    prepare_data(plan)
    params = count_params(plan)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "scripts/experiment_photon.py", *given])
    result = dict(mode=plan.mode, command=command, config=config_record(plan, params),
                  machine=machine_info())

    def save(runs: dict[str, dict]) -> None:
        target = add_derived(runs, plan, params)
        result.update(runs=runs, target_ppl=target, complete=False)
        write_json_atomic(out, result)

    runs = run_all(plan, args.runs, workdir, save)
    leaked = reap_tagged_p2pd(TAG_VAR, tag)
    target = add_derived(runs, plan, params)
    result["machine"].update(loadavg_before=list(load_before), loadavg_after=list(os.getloadavg()))
    result.update(runs=runs, target_ppl=target, complete=True, p2pd_leaked=leaked,
                  total_wall_s=time.perf_counter() - t_start, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json_atomic(out, result)
    title = f"{plan.model}, {plan.peers} peers, H={plan.local_steps}, {plan.mode} mode"
    plot(runs, target, plan.tokens, png, title)
    print_table(runs, target)
    print(f"[experiment] wrote {out} and {png} in {result['total_wall_s']:.0f}s; "
          f"leaked p2pd: {leaked or 'none'}")
    return 1 if leaked or any("error" in r for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
