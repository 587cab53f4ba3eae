"""`p2p-photon`: one console script, one short function per subcommand.

User errors (bad config, bad paths, unreachable peers, ...) are printed as one line on stderr
with a non-zero exit code and no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from .config import load_config
from .errors import EXIT_FAILURE, EXIT_USAGE, UserError

if TYPE_CHECKING:
    from .config import DHTConfig
    from .monitor import MonitorOptions

logger = logging.getLogger("p2p_photon")

def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", "-c", required=required, help="TOML config file (defaults apply when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set inner.lr=3e-3 (repeatable)")


def _config(args: argparse.Namespace):
    return _log_level_from(args, load_config(args.config, args.overrides))


def _log_level_from(args: argparse.Namespace, cfg):
    """The config's logging.level applies unless --log-level (or P2P_PHOTON_LOG) chose one."""
    if args.log_level is None and cfg.logging.level != "INFO":
        from .ui import setup_logging

        setup_logging(cfg.logging.level)
    return cfg


# ----------------------------------------------------------------------------- subcommands


def cmd_config_check(args: argparse.Namespace) -> int:
    from .config import fingerprint, to_toml

    cfg = load_config(args.file, args.overrides)
    if args.print:
        print(to_toml(cfg), end="")
    print(f"{args.file}: ok (run_id {cfg.dht.run_id}, model {cfg.model.preset}, config fingerprint "
          f"{fingerprint(cfg)}; the run fingerprint also includes the tokenizer)")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from . import data

    cfg = _config(args)
    if args.corpus:
        cfg = cfg.replace(data=dict(corpus=args.corpus))
    prep = data.load_prepared(data.prepare(cfg.data, cfg.seed, progress=cfg.logging.progress_bar))
    sizes = ", ".join(f"silo {i}: {prep.tokens(i):,}" for i in range(prep.meta["num_silos"]))
    print(f"prepared {prep.dir} | vocab {prep.vocab_size} | tokenizer {prep.tokenizer_hash[:12]} | {sizes}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .baseline import train_centralized

    cfg = _config(args)
    if args.save:  # fail now, not after the training
        from .state import check_writable

        check_writable(args.save, "--save")
    res = train_centralized(cfg, steps=args.steps, seconds=args.minutes * 60, eval_every=args.eval_every,
                            save_dir=args.save, metrics_out=args.metrics_out)
    print(f"held-out perplexity: {res.initial_ppl:.2f} -> {res.final_ppl:.2f} after {res.steps} steps, "
          f"{res.tokens:,} tokens, {res.wall_s:.0f}s")
    return 0


def _dht_overrides(args: argparse.Namespace) -> list[str]:
    """--initial-peers etc. become dotted overrides, so they are validated like the config."""
    out = []
    for flag in ("initial_peers", "host_maddrs", "announce_maddrs", "identity_path", "run_id"):
        value = getattr(args, flag, None)
        if value:
            out.append(f"dht.{flag}={json.dumps(value)}")
    return out


def _initial_peers_from_file(args: argparse.Namespace) -> None:
    path = getattr(args, "initial_peers_file", None)
    if path:
        from .files import read_maddrs_file

        args.initial_peers = list(args.initial_peers or []) + read_maddrs_file(path)


def cmd_peer(args: argparse.Namespace) -> int:
    from .distributed import launch_ranks, strip_nproc, world_from_env
    from .peer import run_peer

    _initial_peers_from_file(args)
    if args.data:  # bring your own data: the run's spec comes from the swarm
        cfg = _join_run(args)
    else:
        cfg = load_config(args.config, [*_dht_overrides(args), *args.overrides])  # checked before ranks start
    _log_level_from(args, cfg)
    if args.nproc > 1:  # torchrun's launcher; each rank runs this command again without --nproc
        return launch_ranks(args.nproc, strip_nproc(args.argv))
    if world_from_env() > 1:  # a rank under torchrun
        from .peer.ranks import run_ranked_peer

        return run_ranked_peer(cfg, resume=args.resume, summary_out=args.summary_out)
    return run_peer(cfg, resume=args.resume, summary_out=args.summary_out)


def _join_run(args: argparse.Namespace):
    """Fetch the run's spec (checked against its run id) and merge it with the local settings."""
    from pathlib import Path

    from . import corpus, runspec

    corpus.list_corpus(args.data)  # a missing path or an unknown format fails now, before the network
    flags = [o for o in _dht_overrides(args) if not o.startswith("dht.run_id=")]
    local = load_config(args.config, [*flags, *args.overrides])  # local settings validated first
    from .peer.parts import PeerParts

    PeerParts.check_inputs(local)
    spec = runspec.join_run(local.dht, args.run_id, Path(local.data.cache_dir) / "runs", args.spec_timeout)
    return runspec.peer_config(args.config, [*flags, *args.overrides], spec, data=args.data,
                               text_field=args.text_field)


def cmd_run_new(args: argparse.Namespace) -> int:
    from .runspec import create_run

    spec = create_run(_config(args), args.out, tokenizer=args.tokenizer, train_on=args.train_tokenizer_on,
                      eval_path=args.eval, text_field=args.text_field)
    print(f"run {spec.run_id} written to {spec.dir} (eval set {spec.spec['eval']['tokens']:,} tokens, vocab "
          f"{spec.spec['tokenizer']['vocab_size']}); host it with `p2p-photon bootstrap --run {spec.dir}`")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from .bootstrap import run_bootstrap

    spec = None
    if args.run:
        from .runspec import load_run

        spec = load_run(args.run)
        args.run_id = spec.run_id
    cfg = load_config(args.config, [*_dht_overrides(args), *args.overrides])
    if not args.monitor:
        return run_bootstrap(cfg.dht, maddrs_file=args.maddrs_file, spec=spec)
    from .monitor import host_monitor

    hosted = []

    def on_ready(dht) -> None:  # the monitor borrows the bootstrap's DHT once it is up
        hosted.append(host_monitor(dht, run_id=cfg.dht.run_id, http=args.monitor_http, log=args.monitor_log))

    try:
        return run_bootstrap(cfg.dht, maddrs_file=args.maddrs_file, on_ready=on_ready, spec=spec)
    finally:
        for m in hosted:
            m.stop()


def cmd_monitor(args: argparse.Namespace) -> int:
    """Watch a run until --duration ends or Ctrl-C; print the final swarm line."""
    from .monitor import Monitor, TerminalView, serve_dashboard, summary_line
    from .watchdog import stop_on_signals

    opts, dht_cfg = _monitor_config(args)
    monitor = Monitor(opts, dht_cfg=dht_cfg).start()
    dashboard = None
    try:
        if args.http:
            dashboard = serve_dashboard(monitor, args.http)
            print(f"dashboard: {dashboard.url}", flush=True)
        with stop_on_signals(monitor.stop_event), TerminalView(live=not args.no_live) as view:
            monitor.run(duration=args.duration, on_poll=view.update)
        print(summary_line(monitor.state()), flush=True)
    finally:
        if dashboard is not None:
            dashboard.stop()
        monitor.stop()
    return 0


def _monitor_config(args: argparse.Namespace) -> tuple[MonitorOptions, DHTConfig]:
    """MonitorOptions and the client-mode DHT config (flags first, then --set overrides).

    Only the DHT settings are read from the config: the round target and seq_len come from the
    swarm's own progress records, so a monitor cannot show a target that is not the run's.
    """
    from .monitor import MonitorError, MonitorOptions

    _initial_peers_from_file(args)
    if not args.initial_peers:
        raise MonitorError("monitor: give --initial-peers MADDR... or --initial-peers-file JSON "
                           "(the file written by `p2p-photon bootstrap --maddrs-file`)")
    if not (args.run_id or args.config or any(o.strip().startswith("dht.run_id") for o in args.overrides)):
        raise MonitorError("monitor: --run-id ID is required (or a --config that sets dht.run_id)")
    cfg = load_config(args.config, [*_dht_overrides(args), "dht.client_mode=true", *args.overrides])
    opts = MonitorOptions(run_id=cfg.dht.run_id, interval=args.interval, gone_after=args.gone_after,
                          log_path=args.log)
    return opts, cfg.dht


def cmd_monitor_plot(args: argparse.Namespace) -> int:
    from .monitor import plot_log

    out, n, bad = plot_log(args.plot_log, args.out, window=args.gone_after)
    skipped = f", skipped {bad} corrupt line(s)" if bad else ""
    print(f"wrote {out} ({n} observations{skipped})")
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    import socket

    from .trust import TrustError, identity_new, identity_show

    try:
        peer_id = identity_new(args.path) if args.identity_cmd == "new" else identity_show(args.path)
    except OSError as e:  # the path given on the command line is unusable: a usage error
        raise TrustError(f"{args.path}: {e.strerror or e}") from None
    if args.identity_cmd == "show":
        print(peer_id)
        return 0
    print(f"created {os.path.abspath(os.path.expanduser(args.path))} (mode 600): keep it private, it is this "
          "peer's login to a closed swarm; use it as dht.identity_path / --identity-path")
    print(f"peer ID: {peer_id}")
    print("line for the swarm operator's members file (dht.members):")
    print(f"{peer_id}  # {socket.gethostname()}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A swarm checkpoint out as a Hugging Face model directory (weights, config, tokenizer, card)."""
    from .export import export_checkpoint

    logger.info("exporting %s to %s", args.checkpoint, args.out)
    out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, force=args.force,
                            eval_ppl=not args.no_eval)
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained")
    return 0


def _add_dht_args(p: argparse.ArgumentParser, *, initial: bool = True) -> None:
    if initial:
        p.add_argument("--initial-peers", nargs="+", metavar="MADDR",
                       help="multiaddrs of known peers (/ip4/../p2p/..)")
        p.add_argument("--initial-peers-file", metavar="JSON",
                       help="read initial peers from a bootstrap's --maddrs-file")
    p.add_argument("--host-maddrs", nargs="+", metavar="MADDR",
                   help="listen addresses (default /ip4/127.0.0.1/tcp/0)")
    p.add_argument("--announce-maddrs", nargs="+", metavar="MADDR", help="public addresses to announce")
    p.add_argument("--identity-path", help="private key file for a persistent peer ID (created if missing)")
    p.add_argument("--run-id", help="override dht.run_id")


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p-photon", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("P2P_PHOTON_LOG"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default: the config's logging.level, INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="config tools").add_subparsers(dest="config_cmd", required=True)
    check = p.add_parser("check", help="validate a TOML config file")
    check.add_argument("file")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check.add_argument("--print", action="store_true", help="print the resolved config")
    check.set_defaults(func=cmd_config_check)

    _add_data_parser(sub)

    train = sub.add_parser("train", help="centralized baseline on one machine (union of all silos)")
    _add_config_args(train)
    train.add_argument("--steps", type=int, default=0, help="optimizer steps (or use --minutes)")
    train.add_argument("--minutes", type=float, default=0.0, help="train for this long")
    train.add_argument("--eval-every", type=int, default=0, help="evaluate held-out perplexity every N steps")
    train.add_argument("--save", help="write a Hugging Face-loadable model + tokenizer here")
    train.add_argument("--metrics-out", help="write a JSON summary (perplexity curve, tokens, wall time)")
    train.set_defaults(func=cmd_train)

    peer = sub.add_parser("peer", help="a volunteer trainer: join, sync, train, average, checkpoint")
    _add_config_args(peer)
    _add_dht_args(peer)
    peer.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in checkpoint.dir")
    peer.add_argument("--summary-out", help="write a JSON summary (perplexity, rounds, bytes) at exit")
    peer.add_argument("--nproc", type=int, default=1, metavar="N",
                      help="one peer on N processes (devices): launches torchrun --standalone --nproc-per-node N")
    _add_data_args(peer)
    peer.set_defaults(func=cmd_peer)

    boot = sub.add_parser("bootstrap", help="long-lived DHT node with a persistent identity")
    _add_config_args(boot)
    _add_dht_args(boot)
    boot.add_argument("--maddrs-file", help="write the node's multiaddrs here as JSON")
    boot.add_argument("--run", metavar="RUN_DIR", help="host this run: serve its spec (from `run new`)")
    boot.add_argument("--monitor", action="store_true", help="also run the swarm monitor in this process")
    boot.add_argument("--monitor-http", metavar="HOST:PORT", help="with --monitor: serve the dashboard here")
    boot.add_argument("--monitor-log", metavar="JSONL",
                      help="with --monitor: append observations to this file")
    boot.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("identity", help="peer identity files (the key behind a peer ID; closed swarms)")
    p = p.add_subparsers(dest="identity_cmd", required=True)
    new = p.add_parser("new", help="create a private key file; print its peer ID and members-file line")
    new.add_argument("path", help="where to write the key (refuses to overwrite)")
    new.set_defaults(func=cmd_identity)
    show = p.add_parser("show", help="print the peer ID of an identity file")
    show.add_argument("path")
    show.set_defaults(func=cmd_identity)

    _add_run_parser(sub)
    _add_export_parser(sub)
    _add_monitor_parser(sub)
    return parser


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    """`data prepare [--corpus C]`: the shared corpus' silos (the demo's and experiments' path)."""
    p = sub.add_parser("data", help="data tools").add_subparsers(dest="data_cmd", required=True)
    prep = p.add_parser("prepare", help="corpus -> tokenizer -> token shards (per-peer silos + held-out)")
    _add_config_args(prep)
    prep.add_argument("--corpus", help="override data.corpus: 'stdlib', a text file, a directory or a .jsonl")
    prep.set_defaults(func=cmd_data_prepare)


def _add_data_args(peer: argparse.ArgumentParser) -> None:
    """`peer --data PATH [--text-field F] [--spec-timeout S]`: join the swarm's run with a private corpus."""
    peer.add_argument("--data", metavar="PATH", help="join the swarm's run with this private corpus (text files or "
                      "a directory, .jsonl[.gz|.zst], .parquet, a datasets save_to_disk directory)")
    peer.add_argument("--text-field", default="text", help="with --data: the JSONL field / column of the text")
    peer.add_argument("--spec-timeout", type=float, default=30.0,
                      help="with --data: seconds to find the run and fetch its spec from a peer")


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    """`run new --config F (--tokenizer T | --train-tokenizer-on CORPUS) [--eval PATH] -o RUN_DIR`."""
    p = sub.add_parser("run", help="run specs: what every peer of a run shares").add_subparsers(
        dest="run_cmd", required=True)
    new = p.add_parser("new", help="write a run's spec: run-wide settings, tokenizer, public eval set")
    _add_config_args(new)
    tok = new.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="TOKENIZER_JSON", help="the run's tokenizer (tokenizers format)")
    tok.add_argument("--train-tokenizer-on", metavar="CORPUS", help="train a byte-level BPE (data.vocab_size) on it")
    new.add_argument("--eval", metavar="PATH", help="a small public corpus every peer reports perplexity on "
                     "(default with --train-tokenizer-on: held-out documents of that corpus)")
    new.add_argument("--text-field", default="text", help="the JSONL field / column of the text")
    new.add_argument("-o", "--out", required=True, metavar="RUN_DIR", help="the directory to write (new or empty)")
    new.set_defaults(func=cmd_run_new)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    """`export CHECKPOINT_DIR -o OUT [--tokenizer FILE] [--force] [--no-eval]`."""
    export = sub.add_parser("export", help="a checkpoint out as a Hugging Face model directory")
    export.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                        help="a checkpoint (ckpt-XXXXXXXX) or a checkpoint.dir (its newest valid checkpoint)")
    export.add_argument("-o", "--out", required=True, help="the directory to write (new or empty)")
    export.add_argument("--tokenizer", metavar="TOKENIZER_JSON",
                        help="the run's tokenizer.json (default: found in the run's prepared data cache)")
    export.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out")
    export.add_argument("--no-eval", action="store_true", help="do not measure held-out perplexity for the card")
    export.set_defaults(func=cmd_export)


def _add_monitor_parser(sub: argparse._SubParsersAction) -> None:
    """`monitor` (runs the monitor) and its optional sub-action `monitor plot LOG -o PNG`."""
    from .monitor import DEFAULT_GONE_AFTER, DEFAULT_INTERVAL

    mon = sub.add_parser(
        "monitor", help="read-only DHT client: live table, metrics log, plots, HTTP dashboard",
        description="Watch a run's progress records. "
                    "`p2p-photon monitor plot LOG -o PNG` draws a recorded log.")
    _add_config_args(mon)
    mon.add_argument("--initial-peers", nargs="+", metavar="MADDR",
                     help="multiaddrs of known peers (/ip4/../p2p/..)")
    mon.add_argument("--initial-peers-file", metavar="JSON", help="the bootstrap's --maddrs-file")
    mon.add_argument("--run-id", help="the run to watch (required unless --config/--set gives dht.run_id)")
    mon.add_argument("--log", metavar="FILE", help="append every new observation to this JSONL file")
    mon.add_argument("--http", metavar="HOST:PORT", help="serve the web dashboard (default host 127.0.0.1)")
    mon.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between polls")
    mon.add_argument("--gone-after", type=float, default=DEFAULT_GONE_AFTER,
                     help="seconds until a silent peer is gone")
    mon.add_argument("--duration", type=float, default=0.0,
                     help="stop after this many seconds (0 = until Ctrl-C)")
    mon.add_argument("--no-live", action="store_true", help="log a summary line instead of the live table")
    mon.set_defaults(func=cmd_monitor)
    actions = mon.add_subparsers(dest="monitor_action", metavar="{plot}", required=False)
    plot = actions.add_parser("plot", help="draw a recorded JSONL log to a PNG (1200x400 px)")
    plot.add_argument("plot_log", metavar="LOG.jsonl")
    plot.add_argument("-o", "--out", required=True, metavar="PNG")
    plot.add_argument("--gone-after", type=float, default=DEFAULT_GONE_AFTER, help="window for 'peers alive'")
    plot.set_defaults(func=cmd_monitor_plot)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `peer --nproc` hands it to its ranks
    from .ui import setup_logging

    setup_logging(args.log_level or "INFO")
    if args.command == "train" and args.steps <= 0 and args.minutes <= 0:
        print("error: train needs --steps N or --minutes M", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except UserError as e:  # every user-facing error carries its exit code (errors.py)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:  # a path the user gave
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
