#!/usr/bin/env python
"""Projection of a round to 1000 peers: round time, bytes per peer and compute utilization for 8-1000
peers, 10 Mbit-10 Gbit links, 10-200 ms latency, models 125m-7b, the codecs, with and without overlap,
and the group stages (stage 1 in groups of at most averaging.target_group_size, stage 2 among the
groups' representatives, stage 3 back into each group: p2p_photon/averaging/stages.py).

The model of one round (every term is printed in the JSON's `model` section):

    S        = params x bytes per value of the codec (int8: 1 + 4/4096, fp16 2, none 4)
    transfer = the slowest member sets the stage's time. A full member of a group of g (k owners) sends
               (k-1)/k S of parts and (g-1)/k S of results and receives as much; a client (client mode,
               behind NAT) sends S and receives S. Owners stream results as contributions arrive (for
               clients too: OwnerRunner.should_delay_results), so a member takes max(bytes up / uplink,
               bytes down / downlink) / fill(rate), with fill(rate) the measured link fill of the
               all-reduce with data both ways (bench/results/linkfill.json, fp32), interpolated in
               log(rate), flat outside 10 Mbit-1 Gbit. A TCP stream carries at most WINDOW/RTT; a member
               has one stream per other owner
    codec    = params / codec rate, overlapped with the transfer (the stage takes the longer of the two):
               calibrated on linkfill.json's int8 case at 1 Gbit, where the codec is the bottleneck
    overhead = a + b x params per stage (matchmaking, progress records, consensus hash, outer step,
               state update: CPU work), fitted on two measured swarms of different model size
               (bench/results/wan_quick.json: nano, bench/results/wan_photon.json: tiny); b is CPU time
               measured with the peers sharing this machine's cores (half a core each) and is scaled to the
               peer's host cores (HARDWARE); the codec rate scales with them too
    latency  = RTT_PER_STAGE round trips per stage (matchmaking, parts, results, hash) + log2(peers)
               DHT hops for the group key and progress records
    round    = compute + comm (no overlap) or max(compute, comm) + outer step (overlap: the all-reduce of
               round r runs during round r+1's training); utilization = compute / round
    compute  = H local steps x 6 x params x tokens per step / (GPU peak x MFU)

Validation: the same model predicts the measured swarms' averaging time, and the result is written
next to the measurement: bench/results/wan.json (4 peers on 1 Gbit/100/100-20 NAT/10 NAT: a different
bottleneck than the calibration runs) must be within 20 %; the calibration runs are shown too.

    python scripts/project_scale.py                 # the grid -> bench/results/project_scale.json + README rows
    python scripts/project_scale.py --peers 64 --link 100 --rtt 50 --model 125m --codec int8 --overlap
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2p_photon.model import PRESETS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BYTES_PER_VALUE = {"none": 4.0, "fp16": 2.0, "int8": 1.0 + 4.0 / 4096, "int4": 0.5 + 4.0 / 128}
RTT_PER_STAGE = 4  # join request + accept, parts, results, consensus hash
TCP_WINDOW = 4 * 2**20  # bytes in flight per TCP stream (Linux autotuning's typical ceiling)
# measured swarms the model predicts without being fitted on them (wan_10nat: python scripts/wan_swarm.py
# --links 100 10:nat --preset tiny --rounds 3 --out bench/results/wan_10nat.json); wan_10nat_held.json is
# the same run from before owners streamed a client's results (hivemind held them: up, then down)
VALIDATION_RUNS = ("wan.json", "wan_10nat.json")
CALIB_CORES_PER_PEER = 0.5  # 4 peers on 2 cores in the calibration swarms
# what one peer computes with, by model: (name, peak bf16 FLOP/s x count, host cores for the per-parameter CPU
# work of a round: codec, outer step, θ hash, state update; MFU below)
HARDWARE = {"125m": ("1x RTX 4090", 165e12, 2), "350m": ("1x RTX 4090", 165e12, 2), "1b": ("1x A100", 312e12, 4),
            "3b": ("4x A100", 4 * 312e12, 8), "7b": ("8x H100", 8 * 989e12, 16)}
MFU = 0.4
SEQ_LEN, LOCAL_BATCH = 2048, 16  # Photon's small local batches
GRID = dict(peers=[8, 64, 256, 1000], link=[10, 100, 1000, 10000], rtt=[10, 50, 200],
            model=["125m", "350m", "1b", "3b", "7b"], codec=["none", "int8"], overlap=[False, True])


def params_of(preset: str) -> int:
    """Parameters of a Llama preset at its reference vocabulary (embeddings + blocks + norm (+ head))."""
    p = PRESETS[preset]
    emb = p.reference_vocab * p.hidden
    block = 4 * p.hidden**2 + 3 * p.hidden * p.intermediate + 2 * p.hidden
    return emb * (1 if p.tie_embeddings else 2) + p.layers * block + p.hidden


# ------------------------------------------------------------------ calibration


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def fill_points(linkfill: dict) -> list[tuple[float, float]]:
    return sorted((c["rate_mbit"], c["fill"]) for c in linkfill["cases"] if c["codec"] == "none")


def fill_at(rate_mbit: float, points: list[tuple[float, float]]) -> float:
    """The all-reduce's measured link fill, interpolated in log(rate), flat outside the measured rates."""
    if rate_mbit <= points[0][0]:
        return points[0][1]
    for (r0, f0), (r1, f1) in zip(points, points[1:]):
        if rate_mbit <= r1:
            t = math.log(rate_mbit / r0) / math.log(r1 / r0)
            return f0 + t * (f1 - f0)
    return points[-1][1]


def codec_rate(linkfill: dict) -> float:
    """Parameters per second one core runs through the lossy codec (encode own Δ, decode and re-encode
    parts): the int8 case at the highest measured rate, where the codec, not the link, set the time."""
    case = max((c for c in linkfill["cases"] if c["codec"] == "int8"), key=lambda c: c["rate_mbit"])
    return case["params"] / case["allreduce_s"]


def swarm_members(peers: list[dict]) -> list[dict]:
    """A measured swarm's members as the model sees them: links and role."""
    return [dict(up=p["up_mbit"], down=p["down_mbit"], client=p.get("mode") == "client") for p in peers]


def transfer_s(members: list[dict], size: float, points, rtt_s: float = 0.0) -> float:
    """Seconds for one all-reduce of `size` bytes among `members` (links in Mbit/s): the slowest member."""
    g = len(members)
    k = sum(not m["client"] for m in members) or 1
    worst = 0.0
    for m in members:
        streams = max(1, k - (0 if m["client"] else 1))
        cap = streams * TCP_WINDOW * 8 / 1e6 / rtt_s if rtt_s > 0 else math.inf  # Mbit/s
        each_way = size if m["client"] else (k - 1) / k * size + (g - 1) / k * size
        t_up = each_way * 8 / 1e6 / (min(m["up"], cap) * fill_at(m["up"], points))
        t_down = each_way * 8 / 1e6 / (min(m["down"], cap) * fill_at(m["down"], points))
        worst = max(worst, t_up, t_down)
    return worst


def moving_s(run: dict, points, crate: float) -> float:
    """A measured swarm's all-reduce without overheads: its transfer or its codec, whichever is longer."""
    return max(transfer_s(run["members"], run["size"], points), run["params"] / crate)


def measured_swarm(result: dict) -> dict:
    """Params, codec bytes, members and the averaging time of a wan_swarm result: per round in which every
    peer averaged, the slowest member's (the stage's time), then the median over those rounds."""
    peers = result["peers"]
    full = {r["round"] for r in result["round_theta"] if r["peers_averaged"] == len(peers)}
    avg = [max(row["averaging_s"] for p in peers for row in p["per_round"] if row["round"] == r) for r in full]
    params = peers[0]["num_params"]
    return dict(params=params, size=_size_from(peers), members=swarm_members(peers),
                averaging_s=statistics.median(avg), rounds=sorted(full))


def _size_from(peers: list[dict]) -> float:
    """S (bytes of one peer's whole Δ on the wire): a client sends exactly S; otherwise from an owner."""
    g = len(peers)
    k = sum(p.get("mode") != "client" for p in peers)
    for p in peers:
        if p.get("mode") == "client" and p["per_round"]:
            return statistics.median(r["sent"] for r in p["per_round"])
    owner = statistics.median(r["sent"] for r in peers[0]["per_round"])
    return owner / ((k - 1) / k + (g - 1) / k)


def fit_overhead(runs: list[dict], points, crate: float) -> tuple[float, float]:
    """(a, b): overhead = a + b x params seconds per round in the calibration swarms, from the measured
    averaging time minus the modelled transfer/codec (least squares through the runs' points)."""
    xs = [r["params"] for r in runs]
    ys = [r["averaging_s"] - moving_s(r, points, crate) for r in runs]
    if len(runs) == 1:
        return ys[0], 0.0
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def calibrate() -> dict:
    linkfill = _load("linkfill.json")
    if linkfill is None:
        raise SystemExit("error: bench/results/linkfill.json is missing; run python scripts/bench_linkfill.py")
    points = fill_points(linkfill)
    crate = codec_rate(linkfill)
    calib = []
    for name in ("wan_quick.json", "wan_photon.json"):
        res = _load(name)
        if res is None:
            continue
        swarm = res if name != "wan_photon.json" else res.get("photon_swarm")
        if swarm:
            calib.append(dict(source=name, **measured_swarm(swarm)))
    if not calib:
        raise SystemExit("error: no calibration swarm: run python scripts/wan_swarm.py --quick --out "
                         "bench/results/wan_quick.json (and scripts/wan_photon.py)")
    a, b = fit_overhead(calib, points, crate)
    return dict(fill_points=points, codec_params_per_s=crate, overhead_a_s=a, overhead_b_s_per_param=b,
                calibration_runs=calib)


def predict_measured(run: dict, cal: dict) -> float:
    return (cal["overhead_a_s"] + cal["overhead_b_s_per_param"] * run["params"]
            + moving_s(run, cal["fill_points"], cal["codec_params_per_s"]))


def validate(cal: dict) -> list[dict]:
    rows = []
    for c in cal["calibration_runs"]:
        rows.append(_row(c["source"], "calibration", c, cal))
    for name in VALIDATION_RUNS:
        wan = _load(name)
        if wan is not None:
            rows.append(_row(name, "validation", dict(source=name, **measured_swarm(wan)), cal))
    for c in _load("linkfill.json")["cases"]:
        pred = max(c["bytes_sent_per_peer"] * 8 / 1e6 / (c["rate_mbit"] * fill_at(c["rate_mbit"], cal["fill_points"])),
                   c["params"] / cal["codec_params_per_s"] if c["codec"] != "none" else 0.0)
        rows.append(dict(source=f"linkfill {c['rate_mbit']:.0f} Mbit {c['codec']}", role="calibration",
                         measured_s=c["allreduce_s"], predicted_s=pred, error=pred / c["allreduce_s"] - 1))
    return rows


def _row(source: str, role: str, run: dict, cal: dict) -> dict:
    pred = predict_measured(run, cal)
    return dict(source=source, role=role, params=run["params"], measured_s=run["averaging_s"], predicted_s=pred,
                error=pred / run["averaging_s"] - 1)


# ------------------------------------------------------------------ projection


def project(cal: dict, *, peers: int, link: float, rtt_ms: float, model: str, codec: str, overlap: bool,
            group: int = 64, local_steps: int = 500, cores: float | None = None, clients: int = 0) -> dict:
    """One scenario: peers on a symmetric `link` Mbit/s, `rtt_ms` between peers; `clients` members of each
    group in client mode (behind NAT), the others full members; `cores`: host cores for the CPU work."""
    params = params_of(model)
    pts, rtt = cal["fill_points"], rtt_ms / 1e3
    hw, peak, host_cores = HARDWARE[model]
    cores = host_cores if cores is None else cores
    step_s = 6 * params * SEQ_LEN * LOCAL_BATCH / (peak * MFU)
    compute = local_steps * step_s
    b = cal["overhead_b_s_per_param"] * CALIB_CORES_PER_PEER / cores  # the peer's own host cores
    a = cal["overhead_a_s"]
    crate = cal["codec_params_per_s"] * cores
    dht = math.log2(max(2, peers)) * rtt

    def stage(members: int, size: float, lossy: bool, nat: int = 0) -> float:
        m = [dict(up=link, down=link, client=i < nat) for i in range(members)]
        codec_s = params / crate if lossy else 0.0
        return a + b * params + max(transfer_s(m, size, pts, rtt), codec_s) + RTT_PER_STAGE * rtt + dht

    g = min(peers, group)
    groups = math.ceil(peers / g)
    size1 = params * BYTES_PER_VALUE[codec]
    nat = min(clients, g - 1)
    t1 = stage(g, size1, codec != "none", nat)
    t2 = t3 = 0.0
    k = g - nat
    sent = ((k - 1) / k + (g - 1) / k) * size1  # a full member's bytes up (a client's: size1)
    if groups > 1:
        size2 = params * (2.0 if codec != "none" else 4.0)  # stage 2/3: fp16 if the run's codec is lossy
        t2 = stage(groups, size2, False) + 2 * rtt  # + the board wave (a DHT post and read)
        # stage 3: the rep sends x to the owners, they pass it on: each owner's uplink carries (g-1)/g x
        t3 = a + (g - 1) / g * size2 * 8 / 1e6 / (link * fill_at(link, pts)) + RTT_PER_STAGE * rtt
        sent += (g - 1) / g * size2
    comm = t1 + t2 + t3
    round_s = max(compute, comm) + b * params if overlap else compute + comm
    return dict(peers=peers, link_mbit=link, rtt_ms=rtt_ms, model=model, params=params, hardware=hw,
                codec=codec, overlap=overlap, group=g, clients=nat, host_cores=cores, groups=groups,
                stages=1 if groups == 1 else 3,
                compute_s=compute, stage1_s=t1, stage2_s=t2, stage3_s=t3, comm_s=comm, round_s=round_s,
                utilization=compute / round_s, sent_per_peer_mb=sent / 1e6)


README_ROWS = [("125m", 64, 100, "int8"), ("125m", 1000, 100, "int8"), ("125m", 64, 10, "int8"),
               ("350m", 64, 100, "int8"), ("1b", 64, 100, "int8"), ("1b", 256, 1000, "int8"),
               ("7b", 64, 1000, "int8"), ("7b", 1000, 1000, "int8"), ("7b", 64, 10000, "none")]
NAT_ROWS = [("125m", 64, 100, "int8", 32), ("125m", 64, 10, "int8", 32)]  # half of each group behind NAT


def print_markdown(grid: list[dict], nat_rows: list[dict], rtt: float = 50) -> None:
    """README's table: a few volunteer scenarios at 50 ms, without and with overlap."""
    print("\n| model (hardware) | peers | link | codec | round s | comm s | utilization | utilization, overlap "
          "| MB sent per peer |")
    print("|---|---|---|---|---|---|---|---|---|")
    keyed = [((model, peers, link, codec, 0), grid) for model, peers, link, codec in README_ROWS]
    keyed += [(key, nat_rows) for key in NAT_ROWS]
    for (model, peers, link, codec, nat), rows in keyed:
        pair = {r["overlap"]: r for r in rows if (r["model"], r["peers"], r["link_mbit"], r["codec"], r["rtt_ms"],
                                                  r["clients"]) == (model, peers, link, codec, rtt, nat)}
        r, o = pair[False], pair[True]
        speed = f"{link / 1000:g} Gbit" if link >= 1000 else f"{link:g} Mbit"
        who = f"{peers}" + (f" ({nat} per group behind NAT)" if nat else "")
        print(f"| {model} ({r['hardware']}) | {who} | {speed} | {codec} | {r['round_s']:.0f} | {r['comm_s']:.0f} | "
              f"{r['utilization']:.2f} | {o['utilization']:.2f} | {r['sent_per_peer_mb']:.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, help="one scenario: number of peers")
    p.add_argument("--link", type=float, default=100.0, help="Mbit/s each way (default 100)")
    p.add_argument("--rtt", type=float, default=50.0, help="ms round-trip between peers (default 50)")
    p.add_argument("--model", default="125m", choices=list(HARDWARE), help="model preset (default 125m)")
    p.add_argument("--codec", default="int8", choices=list(BYTES_PER_VALUE), help="wire codec (default int8)")
    p.add_argument("--overlap", action="store_true", help="all-reduce during the next round's training")
    p.add_argument("--local-steps", type=int, default=500, help="H: local steps per round (default 500)")
    p.add_argument("--group", type=int, default=64, help="averaging.target_group_size (default 64)")
    p.add_argument("--clients", type=int, default=0, help="members of each group behind NAT (client mode)")
    p.add_argument("--cores", type=float, default=None,
                   help="host cores per peer for the per-parameter CPU work (default: by model, see HARDWARE)")
    p.add_argument("--out", default=str(RESULTS / "project_scale.json"), help="grid JSON path")
    p.add_argument("--markdown", action="store_true", help="also print README's volunteer table")
    args = p.parse_args(argv)
    if args.peers is not None and args.peers < 2:
        p.error("--peers must be >= 2")
    cal = calibrate()
    if args.peers:
        r = project(cal, peers=args.peers, link=args.link, rtt_ms=args.rtt, model=args.model, codec=args.codec,
                    overlap=args.overlap, group=args.group, local_steps=args.local_steps, cores=args.cores,
                    clients=args.clients)
        print(json.dumps(r, indent=1))
        return 0
    checks = validate(cal)
    print(f"{'measured run':>30} {'role':>12} {'measured s':>10} {'predicted s':>11} {'error':>7}")
    for c in checks:
        print(f"{c['source']:>30} {c['role']:>12} {c['measured_s']:>10.2f} {c['predicted_s']:>11.2f} "
              f"{100 * c['error']:>6.0f}%")
    grid = [project(cal, peers=n, link=lk, rtt_ms=rt, model=m, codec=c, overlap=o, group=args.group,
                    local_steps=args.local_steps)
            for n, lk, rt, m, c, o in itertools.product(*GRID.values())]
    print(f"\n{'model':>5} {'peers':>5} {'Mbit':>6} {'rtt':>4} {'codec':>5} {'ovl':>4} {'round s':>8} "
          f"{'comm s':>7} {'util':>5} {'MB/peer':>8}")
    for r in grid:
        if r["rtt_ms"] == 50 and r["peers"] in (64, 1000) and r["link_mbit"] in (100, 1000):
            print(f"{r['model']:>5} {r['peers']:>5} {r['link_mbit']:>6.0f} {r['rtt_ms']:>4.0f} {r['codec']:>5} "
                  f"{str(r['overlap']):>4} {r['round_s']:>8.0f} {r['comm_s']:>7.1f} {r['utilization']:>5.2f} "
                  f"{r['sent_per_peer_mb']:>8.0f}")
    nat_rows = [project(cal, peers=n, link=lk, rtt_ms=50, model=m, codec=c, overlap=o, group=args.group,
                        local_steps=args.local_steps, clients=nat)
                for m, n, lk, c, nat in NAT_ROWS for o in (False, True)]
    validation = [c for c in checks if c["role"] == "validation"]
    out = dict(command="python scripts/project_scale.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               calibration=cal, checks=checks,
               within_20pct=bool(validation) and all(abs(c["error"]) <= 0.2 for c in validation),
               assumptions=dict(hardware={k: dict(name=v[0], host_cores=v[2]) for k, v in HARDWARE.items()},
                                mfu=MFU, seq_len=SEQ_LEN,
                                local_batch=LOCAL_BATCH, local_steps=args.local_steps, group=args.group,
                                tcp_window_bytes=TCP_WINDOW, rtt_per_stage=RTT_PER_STAGE,
                                note="latency is modelled, not measured (no netem in this kernel); links "
                                     "symmetric; every peer a full member (nat_rows: some in client mode); stage 2/3 in fp16 for lossy codecs"),
               model=__doc__.split("The model of one round", 1)[1].split("Validation:", 1)[0].strip(),
               grid=grid, nat_rows=nat_rows, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if args.markdown:
        print_markdown(grid, nat_rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nvalidation within 20 %: {out['within_20pct']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
