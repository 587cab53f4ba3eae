#!/usr/bin/env python
"""Communication vs quality: pseudo-gradient compression and block cycling against synchronous data parallel.

The same short training (N peers on 127.0.0.1, the same preset, data, LR schedule and total tokens)
with each wire setting, one run per setting on a shared bootstrap:

    none         fp32 pseudo-gradients
    fp16         16-bit floats
    int8         blockwise 8-bit, with error feedback (the default config)
    int4         blockwise 4-bit absmax, with error feedback
    int8_block3  int8 + block cycling over 3 parameter groups (outer.block_cycle = 3: one group per round)
    none_block3  fp32 + block cycling over 3 groups

For each: bytes sent per peer per token trained, the reduction against synchronous data parallel
(a ring all-reduce of fp32 gradients every step: 2 (N-1)/N x 4 P bytes per step per peer, one step =
batch x seq_len tokens per peer), the held-out perplexity of the final global model, and the inner
optimizer's state bytes.

    python scripts/bench_comm.py         # 6 runs, ~2-3 min each on 2 cores; bench/results/comm.{json,png}
    python scripts/bench_comm.py --quick --out /tmp/c.json   # smoke: none, int8, int8_block3, 2 tiny rounds
    python scripts/bench_comm.py --only int8,int8_block3 --rounds 8

bytes per token of a peer = the bytes it sent (its summary's `bytes_sent`) / the tokens it trained
(its rounds' `tokens`, a failed attempt's work counted once), averaged over the peers;
reduction_vs_ddp = (2 (N-1)/N x 4 P / (batch x seq_len)) / that. MB = 10^6 bytes, MiB = 2^20.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from benchlib import machine_info, reap_tagged_p2pd, stop_procs  # noqa: E402

from p2p_photon import data  # noqa: E402
from p2p_photon.config import AveragingConfig, load_config  # noqa: E402
from p2p_photon.files import write_json_atomic  # noqa: E402
from p2p_photon.launch import LocalSwarm, Proc  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    compression: str
    block_cycle: int


SETTINGS = {s.name: s for s in (
    Setting("none", "none", 0), Setting("fp16", "fp16", 0), Setting("int8", "int8", 0),
    Setting("int4", "int4", 0), Setting("int8_block3", "int8", 3), Setting("none_block3", "none", 3))}
DEFAULT, UNCOMPRESSED = "int8", "none"  # the default config, and the same run without compression or cycling
QUICK_RUNS = ("none", "int8", "int8_block3")
TAG_VAR = "P2P_PHOTON_BENCH_COMM_TAG"  # inherited by every process we start, p2pd included
STRAGGLER_S = 60.0  # a peer still running this long after another peer of its run exited is stuck
NO_EFFECT = 0.9  # a codec that keeps >= 90% of the uncompressed bytes per token is flagged as not working

logger = logging.getLogger("bench_comm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"CI smoke run: {', '.join(QUICK_RUNS)}; 2 rounds of ~32 local steps, seq_len 64, "
                        "tiny data")
    p.add_argument("--only", default=None,
                   help=f"comma-separated runs out of {','.join(SETTINGS)} "
                        f"(default: all; --quick: {','.join(QUICK_RUNS)})")
    p.add_argument("--peers", type=int, default=3, help="N peers (default 3)")
    p.add_argument("--preset", choices=["nano", "tiny"], default="nano", help="model preset (default nano)")
    p.add_argument("--batch", type=int, default=8, help="inner batch, sequences per local step (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; --quick 64)")
    p.add_argument("--target-samples", type=int, default=None,
                   help="rounds.target_samples_per_round (default N x batch x 128 = 3072, Photon's H = 128 "
                        "local steps per peer; --quick N x batch x 12)")
    p.add_argument("--rounds", type=int, default=None, help="rounds.num_rounds (default 4; --quick 2)")
    p.add_argument("--lr", type=float, default=3e-3, help="inner peak LR (default 3e-3)")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/comm.json; --quick: runs/bench_comm/quick/)")
    p.add_argument("--png", default=None, help="plot path (default: the JSON path with .png)")
    p.add_argument("--workdir", default=None,
                   help="logs, checkpoints, summaries (default runs/bench_comm/<time>)")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "p2p_photon"), help="prepared data cache")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds per run (default 900; --quick 180)")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(QUICK_RUNS if args.quick else SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        p.error(f"--only: unknown run(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(SETTINGS)}")
    args.names = list(dict.fromkeys(names))
    if args.peers < 2 or args.batch < 1 or (args.rounds is not None and args.rounds < 1):
        p.error("--peers must be >= 2, --batch >= 1 and --rounds >= 1")
    return args


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Every number the runs share, derived once from the arguments."""

    mode: str
    preset: str
    peers: int
    batch: int
    seq_len: int
    target_samples_per_round: int
    rounds: int
    lr: float
    vocab_size: int
    eval_batches: int
    run_timeout: float
    data: list[str] = field(default_factory=list)
    averaging: list[str] = field(default_factory=list)
    warmup_fraction: float = 0.05

    @property
    def total_steps(self) -> int:
        """Global steps of the LR schedule: the swarm's summed local steps over all rounds."""
        return max(1, self.rounds * self.target_samples_per_round // self.batch)

    @property
    def local_steps_per_round(self) -> float:
        return self.target_samples_per_round / (self.peers * self.batch)

    @property
    def tokens_per_run(self) -> int:
        return self.rounds * self.target_samples_per_round * self.seq_len


def make_plan(args: argparse.Namespace) -> Plan:
    quick, n = args.quick, args.peers
    seq_len = args.seq_len or (64 if quick else 128)
    vocab = 1024 if quick else 4096
    data_cfg = [f"data.max_corpus_mb={1 if quick else 4}", f"data.vocab_size={vocab}", f"data.num_silos={n}",
                "data.split=noniid", f"data.cache_dir={Path(args.cache_dir).resolve()}"]
    averaging = [f"averaging.target_group_size={n}", "averaging.matchmaking_time=2.0",
                 "averaging.allreduce_timeout=30", "averaging.round_timeout=60"]
    return Plan(mode="quick" if quick else "full", preset=args.preset, peers=n, batch=args.batch,
                seq_len=seq_len,
                target_samples_per_round=args.target_samples or n * args.batch * (12 if quick else 128),
                rounds=args.rounds or (2 if quick else 4), lr=args.lr, vocab_size=vocab,
                eval_batches=4 if quick else 12, run_timeout=args.run_timeout or (180.0 if quick else 900.0),
                data=data_cfg, averaging=averaging)


def run_overrides(plan: Plan, s: Setting) -> list[str]:
    """One run's settings; error feedback is set explicitly for the lossy codecs where the config has it."""
    wire = [f"averaging.compression={s.compression}", f"outer.block_cycle={s.block_cycle}"]
    if "error_feedback" in {f.name for f in dataclasses.fields(AveragingConfig)}:
        wire.append(f"averaging.error_feedback={'true' if s.compression != 'none' else 'false'}")
    return [*plan.data, f"model.preset={plan.preset}", f"model.seq_len={plan.seq_len}",
            f"inner.batch_size={plan.batch}", f"inner.lr={plan.lr}", f"inner.total_steps={plan.total_steps}",
            f"inner.warmup_steps={max(1, round(plan.warmup_fraction * plan.total_steps))}",
            "outer.preset=photon",
            f"rounds.target_samples_per_round={plan.target_samples_per_round}",
            f"rounds.num_rounds={plan.rounds}",
            f"logging.eval_batches={plan.eval_batches}", "logging.eval_every_rounds=0",
            "logging.progress_bar=false",
            "logging.progress_interval=1.0", "checkpoint.every_rounds=0", "dht.startup_timeout=90",
            *plan.averaging, *wire]


def ddp_bytes_per_token(plan: Plan, params: int) -> float:
    """Synchronous data parallel: a ring all-reduce of fp32 gradients, 2 (N-1)/N x 4 P bytes per peer per
    step, each step batch x seq_len tokens per peer."""
    return 2 * (plan.peers - 1) / plan.peers * 4 * params / (plan.batch * plan.seq_len)


# ----------------------------------------------------------------------------- one run


def run_setting(swarm: LocalSwarm, plan: Plan, s: Setting) -> tuple[list[dict], float]:
    """N peer processes on the shared bootstrap under a fresh run_id; returns their summaries and the
    wall time."""
    overrides = [*run_overrides(plan, s), f"dht.run_id=comm-{s.name}-{uuid.uuid4().hex[:6]}"]
    load_config(None, overrides)  # a setting this checkout refuses fails here, in one line, before any peer
    t0 = time.perf_counter()
    procs = [swarm.start_peer(i, name=f"{s.name}-peer{i}", overrides=overrides) for i in range(plan.peers)]
    try:
        codes = wait_together(swarm, procs, plan.run_timeout)
    except TimeoutError:
        stop_procs(swarm, procs)
        raise
    if any(codes):
        bad = next(p for p, c in zip(procs, codes) if c)
        last = (swarm.tail(bad, 1).strip() or "(empty log)")[-200:]
        tails = "\n".join(swarm.tail(p, 15) for p in procs)
        raise RuntimeError(f"peer exit codes {codes}; {bad.name}: {last}\n{tails}")
    return [swarm.summary(p.name) for p in procs], time.perf_counter() - t0


def wait_together(swarm: LocalSwarm, procs: list[Proc], timeout: float) -> list[int]:
    """Exit codes of the peers of one run. They finish their last round in the same all-reduce, so a peer
    still running STRAGGLER_S after another one exited is stuck (e.g. left out of every group): a failure.
    A peer that exits with an error ends the run at once (the others are stopped)."""
    deadline, first_exit = time.monotonic() + timeout, None
    while any(p.alive() for p in procs):
        now, running = time.monotonic(), [p for p in procs if p.alive()]
        if any(p.popen.returncode for p in procs if not p.alive()):
            stop_procs(swarm, running)
            break
        first_exit = first_exit or (now if len(running) < len(procs) else None)
        if now > deadline or (first_exit is not None and now - first_exit > STRAGGLER_S):
            why = (f"after {timeout:.0f}s" if now > deadline
                   else f"{STRAGGLER_S:.0f}s after another peer exited")
            last = swarm.tail(running[0], 1).strip()[-200:]
            names = ", ".join(p.name for p in running)
            raise TimeoutError(f"{names} still running {why}; {running[0].name}: {last}")
        time.sleep(0.5)
    return [p.popen.returncode for p in procs]


def tokens_trained(summary: dict) -> int:
    """Tokens of every local step this peer took: a round's successful entry, else its last failed attempt
    (a retry carries the failed attempt's work, so the attempts of one round are not added up)."""
    ok, failed = {}, {}
    for h in summary["history"]:
        if "tokens" not in h:  # a state download, not a round
            continue
        if h.get("ok"):
            ok[h["round"]] = int(h["tokens"])
        else:
            failed[h["round"]] = max(failed.get(h["round"], 0), int(h["tokens"]))
    return sum(ok.values()) + sum(t for r, t in failed.items() if r not in ok)


def span_s(summaries: list[dict]) -> float:
    """From the earliest peer's start of its first round to the latest peer's end of its last round."""
    rounds = [h for s in summaries for h in s["history"] if "wall_s" in h]
    if not rounds:
        return 0.0
    start = min(h["time"] - h["wall_s"] - h.get("allreduce_s", 0.0) for h in rounds)
    return max(h["time"] for h in rounds) - start


def mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def check_ran_as_asked(s: Setting, summaries: list[dict]) -> None:
    """Peers that report their wire settings must report the ones we asked for."""
    for x in summaries:
        ran = (x.get("compression", s.compression), x.get("block_cycle", s.block_cycle))
        if ran != (s.compression, s.block_cycle):
            raise RuntimeError(f"a peer ran compression {ran[0]}, block_cycle {ran[1]}; asked for "
                               f"{s.compression}, {s.block_cycle}")


def summarize(s: Setting, summaries: list[dict], plan: Plan, params: int) -> dict:
    check_ran_as_asked(s, summaries)
    peers = [dict(bytes_sent=int(x["bytes_sent"]), bytes_received=x.get("bytes_received"),
                  tokens=tokens_trained(x), optimizer_state_bytes=x.get("optimizer_state_bytes"),
                  final_ppl=x["final_ppl"],
                  rounds=x["rounds"], failed_rounds=x["failed_rounds"]) for x in summaries]
    for p in peers:
        p["bytes_per_token"] = p["bytes_sent"] / p["tokens"] if p["tokens"] else None
    bpt = mean([p["bytes_per_token"] for p in peers])
    reported = {int(x["num_params"]) for x in summaries if x.get("num_params") is not None}
    if reported and reported != {params}:
        logger.warning("%s: peers report %s parameters, the plan counted %d", s.name, sorted(reported),
                       params)
    if len(reported) == 1:
        (params,) = reported  # the peers' own count of P, where they report it
    return dict(
        name=s.name, compression=s.compression, block_cycle=s.block_cycle,
        error_feedback=s.compression != "none", num_params=params,
        reduction_vs_ddp=ddp_bytes_per_token(plan, params) / bpt if bpt else None,
        bytes_sent_per_peer=mean([p["bytes_sent"] for p in peers]),
        bytes_received_per_peer=mean([p["bytes_received"] for p in peers]),
        bytes_per_token=bpt, tokens_per_peer=mean([p["tokens"] for p in peers]),
        ppl=summaries[0]["final_ppl"], initial_ppl=summaries[0].get("initial_ppl"),
        optimizer_state_bytes=mean([p["optimizer_state_bytes"] for p in peers]),
        optimizer_state_source=(
            "peer summary" if any(p["optimizer_state_bytes"] is not None for p in peers) else None),
        rounds=summaries[0]["rounds"], failed_rounds=sum(p["failed_rounds"] for p in peers),
        theta_identical=len({x.get("theta") for x in summaries}) == 1,
        num_params_source="peer summary" if reported else "counted from the preset",
        peers=peers)


def attempt(swarm: LocalSwarm, plan: Plan, s: Setting, params: int) -> dict:
    print(f"[comm] {s.name}: compression {s.compression}, block_cycle {s.block_cycle} ...", flush=True)
    t0 = time.perf_counter()
    try:
        summaries, wall = run_setting(swarm, plan, s)
        r = dict(summarize(s, summaries, plan, params), wall_s=span_s(summaries), process_wall_s=wall)
    except Exception as e:  # a failed run (ConfigError too) is recorded and reported; the others still run
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"[comm] {s.name}: FAILED: {type(e).__name__}: {first}", flush=True)
        return dict(name=s.name, compression=s.compression, block_cycle=s.block_cycle,
                    error=f"{type(e).__name__}: {e}", process_wall_s=time.perf_counter() - t0)
    print(f"[comm] {s.name}: {r['bytes_per_token']:.1f} B/token, {r['reduction_vs_ddp']:.1f}x less than DDP, "
          f"ppl {r['ppl']:.2f}, {r['rounds']} rounds ({r['failed_rounds']} failed), "
          f"{r['bytes_sent_per_peer'] / 1e6:.2f} MB sent per peer, {r['wall_s']:.0f}s training "
          f"({r['process_wall_s']:.0f}s in all)", flush=True)
    return r


# ----------------------------------------------------------------------------- derived figures


def estimate_optimizer_state(plan: Plan) -> int:
    """Inner optimizer state of the full model after one step (for peers that do not report it; no block
    cycling)."""
    import torch

    from p2p_photon.inner import InnerTrainer, optimizer_state_bytes
    from p2p_photon.model import build_model

    cfg = load_config(None, [f"inner.batch_size={plan.batch}", f"inner.lr={plan.lr}", "inner.device=cpu"])
    model = build_model(plan.preset, plan.vocab_size, plan.seq_len, 0, "cpu")
    trainer = InnerTrainer(model, cfg.inner)
    batch = torch.randint(0, plan.vocab_size, (plan.batch, plan.seq_len + 1))
    trainer.step(lambda: batch, 0)
    return optimizer_state_bytes(trainer.optimizer)


def fill_optimizer_state(runs: list[dict], plan: Plan) -> None:
    """Where the peers did not report optimizer state: an estimate for full-model runs, None under block
    cycling (its optimizer covers one group only, which an estimate of the full model would overstate)."""
    missing = [r for r in runs if "error" not in r and r["optimizer_state_bytes"] is None]
    if not any(r["block_cycle"] == 0 for r in missing):
        return
    est = estimate_optimizer_state(plan)
    for r in missing:
        if r["block_cycle"] == 0:
            r["optimizer_state_bytes"] = est
            r["optimizer_state_source"] = ("estimate: the inner optimizer of the full model after one step, "
                                           "in this process")


def check_codecs(runs: list[dict]) -> None:
    """Flag a codec that did not shrink the bytes (e.g. a checkout that accepts the setting but sends
    fp32)."""
    ok = {r["name"]: r for r in runs if "error" not in r}
    for r in ok.values():
        base = ok.get("none" if r["block_cycle"] == 0 else f"none_block{r['block_cycle']}")
        if r["compression"] == "none" or base is None or not base["bytes_per_token"]:
            continue
        if r["bytes_per_token"] >= NO_EFFECT * base["bytes_per_token"]:
            ratio = r["bytes_per_token"] / base["bytes_per_token"]
            r["warning"] = (f"{r['compression']} sent {ratio:.2f}x the bytes per token of {base['name']}: "
                            "the codec had no effect")
            print(f"[comm] WARNING {r['name']}: {r['warning']}", flush=True)


def default_record(runs: list[dict]) -> dict:
    ok = {r["name"]: r for r in runs if "error" not in r}
    d, u = ok.get(DEFAULT, {}), ok.get(UNCOMPRESSED, {})
    ppl, ppl_u = d.get("ppl"), u.get("ppl")
    return dict(name=DEFAULT, compression=SETTINGS[DEFAULT].compression, error_feedback=True,
                block_cycle=SETTINGS[DEFAULT].block_cycle, reduction_vs_ddp=d.get("reduction_vs_ddp"),
                bytes_per_token=d.get("bytes_per_token"), ppl=ppl, ppl_uncompressed=ppl_u,
                reduction_vs_ddp_uncompressed=u.get("reduction_vs_ddp"),
                ppl_ratio=ppl / ppl_u if ppl and ppl_u else None, uncompressed_run=UNCOMPRESSED)


# ----------------------------------------------------------------------------- output


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(runs: list[dict], plan: Plan, params: int, default: dict) -> None:
    print(f"\n{plan.preset} ({params:,} params), {plan.peers} peers, "
          f"batch {plan.batch} x seq {plan.seq_len}, "
          f"{plan.rounds} rounds x {plan.target_samples_per_round} samples "
          f"(~{plan.local_steps_per_round:.0f} local steps per peer per round); "
          f"DDP = {ddp_bytes_per_token(plan, params):.0f} B/token per peer")
    print(f"{'run':<12} {'codec':>5} {'block':>5} {'rounds':>6} {'failed':>6} {'tok/peer':>9} {'MB/peer':>8} "
          f"{'B/token':>8} {'x<DDP':>7} {'ppl':>8} {'opt MiB':>7} {'wall s':>6}")
    for r in runs:
        if "error" in r:
            print(f"{r['name']:<12} FAILED: {r['error'].splitlines()[0][:90]}")
            continue
        opt = r["optimizer_state_bytes"]
        print(f"{r['name']:<12} {r['compression']:>5} {r['block_cycle']:>5} {r['rounds']:>6} "
              f"{r['failed_rounds']:>6} {r['tokens_per_peer']:>9.0f} {r['bytes_sent_per_peer'] / 1e6:>8.3f} "
              f"{fmt(r['bytes_per_token'], '8.2f')} "
              f"{fmt(r['reduction_vs_ddp'], '7.1f')} {r['ppl']:>8.2f} {fmt(opt and opt / 2**20, '7.3f')} "
              f"{r['wall_s']:>6.0f}")
    print(f"default ({DEFAULT} + error feedback): {fmt(default['reduction_vs_ddp'], '.1f')}x less than DDP, "
          f"ppl {fmt(default['ppl'], '.2f')} vs {fmt(default['ppl_uncompressed'], '.2f')} uncompressed "
          f"({UNCOMPRESSED}, {fmt(default['reduction_vs_ddp_uncompressed'], '.1f')}x)\n", flush=True)


def plot(runs: list[dict], default: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = [r for r in runs if "error" not in r and r["reduction_vs_ddp"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        marker = "s" if r["block_cycle"] else "o"
        color = "tab:red" if r["name"] == DEFAULT else "tab:blue"
        ax.scatter(r["reduction_vs_ddp"], r["ppl"], marker=marker, color=color, zorder=3)
        ax.annotate(r["name"], (r["reduction_vs_ddp"], r["ppl"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=9)
    if default["ppl_uncompressed"]:
        ax.axhline(default["ppl_uncompressed"], color="grey", lw=0.8, ls=":", label="uncompressed (none)")
        ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("communication reduction vs synchronous data parallel (x, log)")
    ax.set_ylabel("held-out perplexity after training")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ok:
        xs = [r["reduction_vs_ddp"] for r in ok]
        ax.set_xlim(min(xs) / 1.5, max(xs) * 2.5)  # room for the labels
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)




def setup_record(plan: Plan, params: int, command: str) -> dict:
    return dict(
        asdict(plan), num_params=params, command=command, tokens_per_run=plan.tokens_per_run,
        total_steps=plan.total_steps, local_steps_per_round=plan.local_steps_per_round,
        ddp_bytes_per_token=ddp_bytes_per_token(plan, params),
        ddp_formula="2 (N-1)/N x 4 P bytes per peer per step / (batch x seq_len tokens per peer per step)",
        bytes_per_token_formula=("mean over peers of bytes_sent / tokens trained (summary bytes_sent; "
                                 "tokens of its rounds' local steps, a failed attempt's work counted once); "
                                 "peers count the bytes of successful all-reduces only"),
        ppl_note=("held-out perplexity of the final global model (peer 0's summary; θ is the same on every "
                  "peer)"),
        run_overrides_example=run_overrides(plan, SETTINGS[DEFAULT]))




# ----------------------------------------------------------------------------- processes






# ----------------------------------------------------------------------------- main


def count_params(plan: Plan) -> int:
    from p2p_photon.model import build_model
    from p2p_photon.model import count_params as count

    return count(build_model(plan.preset, plan.vocab_size, plan.seq_len, 0, "meta"))


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    plan = make_plan(args)
    out = Path(args.out) if args.out else (ROOT / "runs" / "bench_comm" / "quick" / "comm.json" if args.quick
                                           else ROOT / "bench" / "results" / "comm.json")
    png = Path(args.png) if args.png else out.with_suffix(".png")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = Path(args.workdir) if args.workdir else ROOT / "runs" / "bench_comm" / stamp
    tag = os.environ.setdefault(TAG_VAR, uuid.uuid4().hex)
    t_start, load_before = time.perf_counter(), os.getloadavg()
    print(f"[comm] {plan.mode}: runs {', '.join(args.names)}; {plan.peers} peers, {plan.preset}, "
          f"{plan.rounds} rounds x {plan.target_samples_per_round} samples x seq {plan.seq_len} = "
          f"{plan.tokens_per_run} tokens per run; "
          f"load avg {load_before[0]:.2f}; logs in {workdir}", flush=True)
    data.prepare(load_config(None, plan.data).data, 0, progress=False)
    params = count_params(plan)
    command = shlex.join(["python", "scripts/bench_comm.py", *(sys.argv[1:] if argv is None else argv)])
    result = dict(mode=plan.mode, command=command, setup=setup_record(plan, params, command),
                  machine=machine_info())
    runs: list[dict] = []

    def save(complete: bool) -> dict:
        default = default_record(runs)
        result.update(default=default, runs=runs, complete=complete)
        write_json_atomic(out, result)
        return default

    with LocalSwarm(workdir, threads_per_peer=1) as swarm:
        swarm.start_bootstrap()
        for name in args.names:
            runs.append(attempt(swarm, plan, SETTINGS[name], params))
            save(complete=False)
    leaked = reap_tagged_p2pd(TAG_VAR, tag)
    fill_optimizer_state(runs, plan)
    check_codecs(runs)
    result["machine"].update(loadavg_before=list(load_before), loadavg_after=list(os.getloadavg()))
    result.update(p2pd_leaked=leaked, total_wall_s=time.perf_counter() - t_start,
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    default = save(complete=True)
    plot(runs, default, png, f"{plan.preset}, {plan.peers} peers, {plan.rounds} rounds x "
                             f"{plan.target_samples_per_round} samples, {plan.mode} mode")
    print_table(runs, plan, params, default)
    print(f"[comm] wrote {out} and {png} in {result['total_wall_s']:.0f}s; leaked p2pd: {leaked or 'none'}")
    return 1 if leaked or any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
