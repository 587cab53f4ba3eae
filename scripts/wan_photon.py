#!/usr/bin/env python
"""Photon's wall-time claim on an emulated WAN (needs root): our swarm vs synchronous data-parallel training.

Photon reports "35 % faster than baseline distributed training by communicating 64-512x less". Here both
run the same model on the same links (scripts/netemu.py: one namespace per peer, tbf-shaped uplink and
downlink, public addresses: gloo needs every rank reachable):

  photon  the real CLI, one peer per host (scripts/wan_swarm.py), H local steps then one all-reduce of Δ
          per round; the global model's held-out perplexity after every round
  ddp     torch.distributed with the gloo backend across the same hosts, DistributedDataParallel: one
          fp32 gradient all-reduce per step, the same per-rank batch, data silo, optimizer (8-bit AdamW),
          schedule (indexed by samples seen, as the swarm's global step is) and seed; held-out perplexity
          every --eval-every steps

Both measure training wall time from the first step (start-up and rendezvous excluded; the DDP clock also
leaves out its evaluations). The target is the worse of the two final perplexities, so both reach it;
each side's time to it is interpolated in log-perplexity between evaluations. DDP stops at Photon's final
perplexity, at --token-factor times Photon's tokens, or after --ddp-max-s seconds.

    python scripts/wan_photon.py                         # 4 peers on 100 Mbit, tiny, 4 rounds (~30 min here)
    python scripts/wan_photon.py --links 100 100 --rounds 2 --preset nano --ddp-max-s 300

Prints a table, writes bench/results/wan_photon.json (and the two runs' logs under runs/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import netemu  # noqa: E402
import wan_swarm  # noqa: E402
from benchlib import machine_info  # noqa: E402

from p2p_photon.files import write_json_atomic  # noqa: E402

DDP_PORT = 29517


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", nargs="+", default=["100", "100", "100", "100"],
                   help="UP[/DOWN] Mbit/s per peer, public (default: four 100 Mbit peers)")
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--rounds", type=int, default=4, help="Photon rounds (default 4)")
    p.add_argument("--eval-every", type=int, default=8, help="DDP steps between held-out evaluations (default 8)")
    p.add_argument("--token-factor", type=float, default=2.0,
                   help="DDP may train on up to this many times Photon's tokens (default 2)")
    p.add_argument("--ddp-max-s", type=float, default=1800.0, help="DDP training time limit in s (default 1800)")
    p.add_argument("--workdir", default=None, help="logs (default runs/wan-photon-<time>)")
    p.add_argument("--out", default=str(ROOT / "bench/results/wan_photon.json"), help="JSON path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for both runs (repeatable)")
    # one DDP rank (the script starts these itself, one per namespace)
    for flag in ("--ddp-rank", "--ddp-world", "--ddp-master", "--ddp-target", "--ddp-tokens", "--ddp-out"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_rank is not None:
        return args
    try:
        args.link_specs = [wan_swarm.parse_link(x) for x in args.links]
    except ValueError as e:
        p.error(str(e))
    if any(x["nat"] for x in args.link_specs):
        p.error("--links: no ':nat' here (gloo needs every rank to accept connections)")
    if len(args.links) < 2 or args.rounds < 1 or args.eval_every < 1:
        p.error("need at least two links, --rounds >= 1 and --eval-every >= 1")
    return args


def swarm_args(args, workdir: Path | None) -> argparse.Namespace:
    """wan_swarm's arguments for the Photon run (workdir None: this run's --workdir, if given)."""
    where = ["--workdir", str(workdir)] if workdir else ["--workdir", args.workdir] if args.workdir else []
    return wan_swarm.parse_args(["--links", *args.links, "--preset", args.preset, "--rounds", str(args.rounds),
                                 *where, "--set", "logging.eval_every_rounds=1",
                                 *[x for o in args.overrides for x in ("--set", o)]])


# ------------------------------------------------------------------ the two curves


def photon_curve(summaries: dict) -> tuple[list[dict], int]:
    """[(seconds from the swarm's first step, tokens the swarm trained, held-out ppl)] per round, and the
    bytes one peer sent per round (median); from the peers' summaries (θ is one model: any peer's eval)."""
    hists = {n: [h for h in s.get("history", []) if h.get("ok")] for n, s in summaries.items()}
    t0 = min(h[0]["time"] - h[0]["wall_s"] - h[0]["allreduce_s"] for h in hists.values() if h)
    evaluator = next(n for n, h in sorted(hists.items()) if any(x.get("eval_loss") is not None for x in h))
    curve = [dict(seconds=0.0, tokens=0, ppl=math.exp(summaries[evaluator]["initial_loss"]))]
    rounds = sorted({x["round"] for h in hists.values() for x in h})
    for r in rounds:
        mine = [x for x in hists[evaluator] if x["round"] == r and x.get("eval_loss") is not None]
        if not mine:
            continue
        tokens = sum(x["tokens"] for h in hists.values() for x in h if x["round"] <= r)
        curve.append(dict(seconds=mine[0]["time"] - t0, tokens=tokens, ppl=math.exp(mine[0]["eval_loss"]),
                          round=r))
    sent = sorted(x["sent"] for h in hists.values() for x in h)
    return curve, sent[len(sent) // 2] if sent else 0


def time_to(curve: list[dict], target: float) -> float | None:
    """Seconds until the curve's perplexity first reaches `target`, interpolated in log-ppl between two
    points; None if it never does."""
    for a, b in zip(curve, curve[1:]):
        if b["ppl"] <= target:
            if a["ppl"] <= target:
                return a["seconds"]
            la, lb, lt = math.log(a["ppl"]), math.log(b["ppl"]), math.log(target)
            return a["seconds"] + (b["seconds"] - a["seconds"]) * (la - lt) / (la - lb)
    return curve[0]["seconds"] if curve and curve[0]["ppl"] <= target else None


# ------------------------------------------------------------------ DDP


def ddp_rank(args) -> int:
    """One rank of the synchronous baseline (runs inside its host's namespace)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from p2p_photon import baseline, data
    from p2p_photon.config import load_config
    from p2p_photon.inner import InnerTrainer, evaluate

    rank, world = int(args.ddp_rank), int(args.ddp_world)
    cfg = load_config(None, json.loads(os.environ["WAN_PHOTON_OVERRIDES"]))
    dist.init_process_group("gloo", init_method=f"tcp://{args.ddp_master}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    prep, model, heldout, device = baseline.setup(cfg)
    ddp = DistributedDataParallel(model)
    silos = prep.meta["num_silos"]
    stream = data.open_silo_stream(prep, [rank % silos], seq_len=cfg.model.seq_len,
                                   batch_size=cfg.inner.batch_size, seed=cfg.seed, stream_id=rank)
    trainer = InnerTrainer(ddp, cfg.inner, device)
    target, budget = float(args.ddp_target), int(args.ddp_tokens)
    curve = [dict(seconds=0.0, tokens=0, ppl=math.exp(evaluate(model, heldout, cfg.inner, device)), step=0)]
    train_s, tokens, step, stop = 0.0, 0, 0, torch.zeros(1)
    while not stop.item():
        st = trainer.step(stream.next_batch, step * world)  # the LR schedule follows samples seen
        step, train_s, tokens = step + 1, train_s + st.seconds, tokens + st.tokens * world
        if step % int(args.eval_every) == 0:
            if rank == 0:
                ppl = math.exp(evaluate(model, heldout, cfg.inner, device))
                curve.append(dict(seconds=train_s, tokens=tokens, ppl=ppl, step=step))
                print(f"[ddp] step {step} | {train_s:.0f}s | {tokens} tokens | ppl {ppl:.1f}", flush=True)
                stop[0] = float(ppl <= target or tokens >= budget or train_s >= float(args.ddp_max_s))
            dist.broadcast(stop, src=0)
    if rank == 0:
        write_json_atomic(Path(args.ddp_out), dict(curve=curve, steps=step, tokens=tokens, train_s=train_s,
                                                   step_s=train_s / max(step, 1)))
    dist.destroy_process_group()
    return 0


def run_ddp(args, workdir: Path, target: float, tokens: int) -> dict:
    overrides = wan_swarm.overrides_for(swarm_args(args, workdir))
    out = workdir / "ddp.json"
    with netemu.Internet() as net:
        hosts = [net.public(f"rank{i}", x["up_mbit"], x["down_mbit"]) for i, x in enumerate(args.link_specs)]
        env = {**os.environ, "WAN_PHOTON_OVERRIDES": json.dumps(overrides), "GLOO_SOCKET_IFNAME": "eth0",
               "PYTHONPATH": str(ROOT)}
        procs, logs = [], [open(workdir / f"ddp-rank{i}.log", "w") for i in range(len(hosts))]
        for i, (h, log) in enumerate(zip(hosts, logs)):
            procs.append(h.popen([sys.executable, __file__, "--ddp-rank", str(i), "--ddp-world", str(len(hosts)),
                                  "--ddp-master", f"{hosts[0].addr}:{DDP_PORT}", "--ddp-target", repr(target),
                                  "--ddp-tokens", str(tokens), "--ddp-out", str(out),
                                  "--eval-every", str(args.eval_every), "--ddp-max-s", str(args.ddp_max_s)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + args.ddp_max_s + 600
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes.append(None)
        for log in logs:
            log.close()
        wire = [h.wire_bytes() for h in hosts]
    if not out.exists():
        tail = (workdir / "ddp-rank0.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the DDP run wrote no result (exit codes {codes}); rank 0's log ends:\n{tail}")
    res = json.loads(out.read_text())
    res.update(exit_codes=codes, wire_sent_per_rank=sorted(w[0] for w in wire)[len(wire) // 2])
    return res


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ddp_rank is not None:
        return ddp_rank(args)
    workdir = wan_swarm.start(swarm_args(args, None), "wan-photon")
    if workdir is None:
        return 2
    (workdir / "photon").mkdir(parents=True, exist_ok=True)
    sargs = swarm_args(args, workdir / "photon")
    print(f"[wan-photon] photon: {len(args.links)} peers on {' '.join(args.links)} Mbit, {args.preset}, "
          f"{args.rounds} rounds; logs in {workdir}", flush=True)
    raw = wan_swarm.run(sargs, workdir / "photon")
    if any(c != 0 for c in raw["exit_codes"]):
        print(f"error: the Photon swarm failed (exit codes {raw['exit_codes']}); logs in {workdir / 'photon'}",
              file=sys.stderr)
        return 1
    pcurve, p_sent = photon_curve(raw["summaries"])
    p_final, p_tokens = pcurve[-1]["ppl"], pcurve[-1]["tokens"]
    print(f"[wan-photon] photon: ppl {pcurve[0]['ppl']:.1f} -> {p_final:.1f} in {pcurve[-1]['seconds']:.0f} s, "
          f"{p_tokens} tokens; DDP next (stops at ppl {p_final:.1f})", flush=True)
    ddp = run_ddp(args, workdir, p_final, int(p_tokens * args.token_factor))
    dcurve = ddp["curve"]
    target = max(p_final, min(x["ppl"] for x in dcurve))
    tp, td = time_to(pcurve, target), time_to(dcurve, target)
    num_params = next(iter(raw["summaries"].values())).get("num_params")
    result = dict(
        command="python scripts/wan_photon.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        machine=machine_info(), links=args.links, preset=args.preset, num_params=num_params, rounds=args.rounds,
        settings=wan_swarm.overrides_for(sargs), target_ppl=target,
        photon_swarm=wan_swarm.figures(sargs, raw),  # per peer and round, as wan.json (project_scale calibrates on it)
        photon=dict(curve=pcurve, seconds_to_target=tp, tokens=p_tokens, sent_per_round=p_sent,
                    rounds_to_target=next((x.get("round") for x in pcurve[1:] if x["ppl"] <= target), None)),
        ddp=dict(curve=dcurve, seconds_to_target=td, tokens=ddp["tokens"], steps=ddp["steps"],
                 step_s=ddp["step_s"], grad_bytes_per_step=4 * (num_params or 0),
                 wire_sent_per_rank=ddp["wire_sent_per_rank"], exit_codes=ddp["exit_codes"]),
        speedup=(td / tp) if tp and td else None,
        time_saved=(1 - tp / td) if tp and td else None,
        note="tbf-shaped links, no added latency (netem is not in this kernel: latency would favour Photon "
             "further, DDP pays it every step); all peers share this machine's 2 CPU cores in both runs",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    head = f"s to ppl {target:.1f}"
    print(f"{'':>8} {head:>16} {'tokens':>10} {'final ppl':>10}")
    for name, side, curve in (("photon", result["photon"], pcurve), ("ddp", result["ddp"], dcurve)):
        s = side["seconds_to_target"]
        print(f"{name:>8} {'-' if s is None else f'{s:16.0f}':>16} {side['tokens']:>10} {curve[-1]['ppl']:>10.1f}")
    if result["speedup"]:
        print(f"Photon reaches ppl {target:.1f} {result['speedup']:.2f}x as fast as DDP "
              f"({100 * result['time_saved']:.0f} % less wall time)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), result)
    print(f"[wan-photon] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
