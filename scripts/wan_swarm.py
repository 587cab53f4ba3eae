#!/usr/bin/env python
"""A swarm on an emulated WAN (needs root): the bootstrap node and N peers, each in its own network
namespace with its own tbf-shaped uplink/downlink, some behind a NAT router (nftables masquerade), all
running the real CLI (scripts/netemu.py builds the network).

A link is UP/DOWN in Mbit/s (UP alone: symmetric), `:nat` puts the peer behind NAT. A NAT'd peer runs in
client mode (sends its parts of Δ and receives the averages, owns no slice), or with `--relay` through
the bootstrap node's circuit relay as a full member. `--late K` starts peer K once the first peer has
finished round 0 (it downloads the state through its link).

    python scripts/wan_swarm.py                                   # 4 peers: 1000, 100, 100/20:nat, 10:nat; tiny model
    python scripts/wan_swarm.py --quick                           # the suite's smoke: 100, 100/20:nat, 100/20:nat, nano, 8 rounds
    python scripts/wan_swarm.py --links 100 100/20:nat --rounds 6 --preset nano --relay

Per peer and round it records training time, the averaging time (matchmaking and all-reduce), bytes
sent (the all-reduce's payload) and on the wire (the namespace's interface counters: DHT and
libp2p included), compute utilization (training time / round time) and the uplink fill of the
averaging (payload bytes / averaging time / uplink rate; matchmaking is inside the averaging time,
so this is a lower bound on the all-reduce's own fill, which scripts/bench_allreduce.py --wan
measures). Prints a table, writes bench/results/wan.json and wan.png (a --quick run: its workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import netemu  # noqa: E402
from benchlib import machine_info, reap_tagged_p2pd  # noqa: E402

from p2p_photon import data  # noqa: E402
from p2p_photon.config import load_config  # noqa: E402
from p2p_photon.files import write_json_atomic  # noqa: E402
from p2p_photon.launch import LocalSwarm  # noqa: E402

TAG_VAR = "P2P_PHOTON_BENCH_TAG"
SMALL = ["data.max_corpus_mb=1", "data.vocab_size=1024", "data.num_silos=4", "inner.warmup_steps=5",
         "inner.total_steps=400", "logging.progress_interval=0.5", "logging.progress_bar=false",
         "logging.eval_batches=4", "checkpoint.every_rounds=0", "dht.startup_timeout=120",
         "averaging.matchmaking_time=2.0", "averaging.allreduce_timeout=60", "averaging.round_timeout=60"]
DEFAULT_LINKS = ["1000", "100", "100/20:nat", "10:nat"]
QUICK_LINKS = ["100", "100/20:nat", "100/20:nat"]


def parse_link(text: str) -> dict:
    """'100/20:nat' -> {'up': 100.0, 'down': 20.0... } (UP/DOWN Mbit/s, optional :nat); ValueError if malformed."""
    spec, _, flag = text.partition(":")
    if flag not in ("", "nat"):
        raise ValueError(f"link {text!r}: the only suffix is ':nat'")
    up, _, down = spec.partition("/")
    try:
        up_mbit, down_mbit = float(up), float(down or up)
    except ValueError:
        raise ValueError(f"link {text!r}: expected UP[/DOWN] in Mbit/s, e.g. 100/20 or 100/20:nat") from None
    if up_mbit <= 0 or down_mbit <= 0:
        raise ValueError(f"link {text!r}: rates must be > 0")
    return dict(spec=text, up_mbit=up_mbit, down_mbit=down_mbit, nat=flag == "nat")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--links", nargs="+", default=None,
                   help=f"one link per peer, UP[/DOWN][:nat] in Mbit/s (default {' '.join(DEFAULT_LINKS)}; "
                        f"--quick {' '.join(QUICK_LINKS)})")
    p.add_argument("--preset", default=None, help="model preset (default tiny; --quick nano)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 6; --quick 8)")
    p.add_argument("--samples", type=int, default=None, help="rounds.target_samples_per_round (default 192 x peers)")
    p.add_argument("--relay", action="store_true",
                   help="NAT'd peers reach the swarm through the bootstrap's relay (dht.auto_relay) instead of "
                        "client mode")
    p.add_argument("--late", type=int, default=None,
                   help="start this peer once peer 0 finished round 0 (default: --quick 2, else none)")
    p.add_argument("--quick", action="store_true", help="smoke: 3 peers (two behind NAT, one late), nano, 8 rounds")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds the run may take (default 1200)")
    p.add_argument("--workdir", default=None, help="logs and summaries (default: runs/wan-<time>)")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "p2p_photon"), help="prepared data cache")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/wan.json; --quick: workdir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every peer (repeatable)")
    args = p.parse_args(argv)
    try:
        args.links = [parse_link(x) for x in (args.links or (QUICK_LINKS if args.quick else DEFAULT_LINKS))]
    except ValueError as e:
        p.error(str(e))
    args.preset = args.preset or ("nano" if args.quick else "tiny")
    args.rounds = args.rounds or (8 if args.quick else 6)
    args.samples = args.samples or 192 * len(args.links)
    if args.late is None and args.quick:
        args.late = len(args.links) - 1
    if len(args.links) < 2:
        p.error("--links: at least two peers")
    if not any(not x["nat"] for x in args.links) and not args.relay:
        p.error("--links: at least one public peer (client-mode peers need someone to own the slices)")
    if args.late is not None and not 0 < args.late < len(args.links):
        p.error(f"--late must name a peer 1..{len(args.links) - 1}")
    return args


def overrides_for(args) -> list[str]:
    seq = ["model.seq_len=64", "inner.batch_size=8"] if args.preset == "nano" else ["model.seq_len=128",
                                                                                    "inner.batch_size=4"]
    return [*SMALL, *seq, f"model.preset={args.preset}", f"data.cache_dir={args.cache_dir}",
            f"rounds.num_rounds={args.rounds}", f"rounds.target_samples_per_round={args.samples}",
            f"averaging.target_group_size={len(args.links)}", f"dht.run_id=wan-{uuid.uuid4().hex[:8]}",
            *args.overrides]


def run(args, workdir: Path) -> dict:
    """Build the network, run the swarm, tear everything down; the raw per-peer results."""
    names = [f"peer{i}" for i in range(len(args.links))]
    tag = os.environ[TAG_VAR] = uuid.uuid4().hex
    t0 = time.monotonic()
    with netemu.Internet() as net:
        boot = net.public("boot")
        hosts = [(net.behind_nat if link["nat"] else net.public)(name, link["up_mbit"], link["down_mbit"])
                 for name, link in zip(names, args.links)]
        # the NAT is real: a host behind it connects out, and nobody outside can connect to it
        nat_ok = {h.name: netemu.connects(h, boot) and not netemu.connects(boot, h) for h in hosts if h.natted}
        wrap = {h.name: ["ip", "netns", "exec", h.ns] for h in [boot, *hosts]}
        with LocalSwarm(workdir, overrides=overrides_for(args)) as swarm:
            swarm.start_bootstrap(extra=["--host-maddrs", f"/ip4/{boot.addr}/tcp/0"], wrap=wrap["boot"], timeout=180)
            procs = {}

            def start(i: int) -> None:
                host, link = hosts[i], args.links[i]
                mode = [] if not link["nat"] else (["dht.auto_relay=true"] if args.relay else ["dht.client_mode=true"])
                procs[names[i]] = swarm.start_peer(i % 4, name=names[i], overrides=mode, wrap=wrap[host.name],
                                                   extra_args=["--host-maddrs", f"/ip4/{host.addr}/tcp/0"])

            for i in range(len(names)):
                if i != args.late:
                    start(i)
            if args.late is not None:
                first = workdir / f"{names[0]}.log"
                deadline = time.monotonic() + args.timeout
                while "round 0 | loss" not in (first.read_text() if first.exists() else ""):
                    if time.monotonic() > deadline or not procs[names[0]].alive():
                        raise RuntimeError(f"{names[0]} did not finish round 0: {swarm.tail(procs[names[0]])}")
                    time.sleep(0.5)
                start(args.late)
            codes = swarm.wait([procs[n] for n in names], timeout=args.timeout)
            wire = {h.name: h.wire_bytes() for h in hosts}
    leaked = reap_tagged_p2pd(TAG_VAR, tag)
    summaries = {n: json.loads(swarm.summary_path(n).read_text()) for n in names if swarm.summary_path(n).exists()}
    logs = {n: (workdir / f"{n}.log").read_text(errors="replace") for n in names if (workdir / f"{n}.log").exists()}
    return dict(exit_codes=codes, wall_s=time.monotonic() - t0, p2pd_leaked=len(leaked), wire=wire,
                summaries=summaries, names=names, nat_ok=nat_ok, logs=logs)


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def figures(args, raw: dict) -> dict:
    """Per peer and round: the table's rows; per round: θ agreement."""
    peers, rounds = [], []
    for i, name in enumerate(raw["names"]):
        s, link = raw["summaries"].get(name), args.links[i]
        hist = [h for h in (s or {}).get("history", []) if h.get("ok")]
        rows, rate = [], link["up_mbit"] * 1e6 / 8
        for prev, h in zip([None, *hist], hist):
            # a round's time: from the end of the round before (when it is this peer's previous round), else
            # its training phase plus its averaging
            round_s = (h["time"] - prev["time"] if prev is not None and prev["round"] == h["round"] - 1
                       else h["wall_s"] + h["allreduce_s"])
            rows.append(dict(round=h["round"], round_s=round_s, train_s=h["train_s"], averaging_s=h["allreduce_s"],
                             sent=h["sent"], group=h["group"], theta=h["theta"],
                             utilization=h["train_s"] / round_s if round_s else None,
                             uplink_fill=h["sent"] / h["allreduce_s"] / rate if h["allreduce_s"] else None))
        sync = [h for h in (s or {}).get("history", []) if h.get("event") == "sync"]
        med = {key: _median(rows, key) for key in ("round_s", "train_s", "averaging_s", "sent", "utilization",
                                                    "uplink_fill")}
        sent, received = raw["wire"].get(name, (0, 0))
        log = raw["logs"].get(name, "")
        relayed = next((ln.split("reachable through relay: ", 1)[1].strip() for ln in log.splitlines()
                        if "reachable through relay: " in ln), None)
        peers.append(dict(name=name, link=link["spec"], up_mbit=link["up_mbit"], down_mbit=link["down_mbit"],
                          nat=link["nat"], mode=("relay" if args.relay else "client") if link["nat"] else "public",
                          nat_verified=raw["nat_ok"].get(name), relayed_via=relayed,
                          client_mode="client mode: accepting no connections" in log,
                          late=i == args.late, exit_code=raw["exit_codes"][i], rounds_averaged=len(rows),
                          synced_at=sync[0]["round"] if sync else None, round_s=med["round_s"],
                          train_s=med["train_s"], averaging_s=med["averaging_s"], sent_per_round=med["sent"],
                          utilization=med["utilization"], uplink_fill=med["uplink_fill"],
                          wire_sent=sent, wire_received=received, final_theta=(s or {}).get("theta"),
                          num_params=(s or {}).get("num_params"), per_round=rows))
    for r in range(args.rounds):
        thetas = {row["theta"] for p in peers for row in p["per_round"] if row["round"] == r}
        rounds.append(dict(round=r, peers_averaged=sum(any(x["round"] == r for x in p["per_round"]) for p in peers),
                           distinct_theta=len(thetas)))
    return dict(peers=peers, round_theta=rounds, one_theta_every_round=all(x["distinct_theta"] == 1 for x in rounds),
                one_theta_at_end=len({p["final_theta"] for p in peers}) == 1)


def print_table(fig: dict) -> None:
    print(f"{'peer':>6} {'link':>12} {'mode':>7} {'rounds':>6} {'round s':>8} {'train s':>8} {'avg s':>6} "
          f"{'MB/rd':>6} {'util':>5} {'fill':>5}")
    for p in fig["peers"]:
        print(f"{p['name']:>6} {p['link']:>12} {p['mode']:>7} {p['rounds_averaged']:>6} {_fmt(p['round_s'], '8.1f')} "
              f"{_fmt(p['train_s'], '8.1f')} {_fmt(p['averaging_s'], '6.1f')} "
              f"{_fmt(p['sent_per_round'] and p['sent_per_round'] / 1e6, '6.2f')} {_fmt(p['utilization'], '5.2f')} "
              f"{_fmt(p['uplink_fill'], '5.3f')}")
    print("one θ after every round:", fig["one_theta_every_round"], "| one θ at the end:", fig["one_theta_at_end"])


def plot(fig: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = fig["peers"]
    labels = [f"{p['name']}\n{p['link']} ({p['mode']})" for p in peers]
    train = [p["train_s"] or 0 for p in peers]
    avg = [p["averaging_s"] or 0 for p in peers]
    other = [max(0.0, (p["round_s"] or 0) - t - a) for p, t, a in zip(peers, train, avg)]
    fig_, ax = plt.subplots(figsize=(1.8 * len(peers) + 2, 4))
    ax.bar(labels, train, label="training")
    ax.bar(labels, avg, bottom=train, label="averaging (matchmaking + all-reduce)")
    ax.bar(labels, other, bottom=[t + a for t, a in zip(train, avg)], label="other")
    ax.set_ylabel("median seconds per round")
    ax.set_title("p2p_photon on an emulated WAN")
    ax.legend(fontsize=8)
    fig_.tight_layout()
    fig_.savefig(path, dpi=100)
    plt.close(fig_)


def start(args: argparse.Namespace, stem: str) -> Path | None:
    """What a run on the emulated internet does first (this script and wan_photon.py): SIGTERM (a test's
    timeout, a CI cancel) unwinds like Ctrl-C (peers stopped, namespaces deleted); None, after saying why,
    where namespaces cannot work; stale namespaces of dead runs removed; the swarm's data prepared. Returns
    the work directory (--workdir, or runs/<stem>-<time>)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    why = netemu.why_unavailable()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return None
    netemu.cleanup_stale()
    cfg = load_config(None, overrides_for(args))
    data.prepare(cfg.data, cfg.seed, progress=False)
    return Path(args.workdir or ROOT / "runs" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = start(args, "wan")
    if workdir is None:
        return 2
    out = Path(args.out) if args.out else (workdir / "wan.json" if args.quick else ROOT / "bench/results/wan.json")
    print(f"[wan] {len(args.links)} peers ({' '.join(x['spec'] for x in args.links)}), {args.preset}, "
          f"{args.rounds} rounds; logs in {workdir}", flush=True)
    raw = run(args, workdir)
    fig = figures(args, raw)
    print_table(fig)
    png = out.with_suffix(".png")
    plot(fig, png)
    result = dict(command="python scripts/wan_swarm.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                  machine=machine_info(), preset=args.preset, rounds=args.rounds, samples_per_round=args.samples,
                  relay=args.relay, settings=[*SMALL, *args.overrides],
                  wall_s=raw["wall_s"], p2pd_leaked=raw["p2pd_leaked"], exit_codes=raw["exit_codes"], **fig,
                  note="tbf shaping, no added latency (netem is not in this kernel); utilization = training time / "
                       "round time; uplink_fill = all-reduce payload / averaging time (matchmaking included) / uplink",
                  timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(f"[wan] wrote {out} and {png}")
    return 0 if all(c == 0 for c in raw["exit_codes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
