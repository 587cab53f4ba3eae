"""`p2p-photon bootstrap`: a long-lived DHT node that volunteers use to find each other.

It keeps its peer ID across restarts (`dht.identity_path`), prints the `--initial-peers`
line to give volunteers, writes the same information to a JSON file (atomically, for
scripts and tests), logs a heartbeat with the number of connected peers, and runs until
SIGINT/SIGTERM or `stop_event`. Training does not depend on it once peers have met.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import hivemind
from hivemind.dht import DHTNode

from p2p_photon.config import DHTConfig
from p2p_photon.files import write_json_atomic
from p2p_photon.network import NetworkError, shutdown_dht, start_dht, visible_maddrs
from p2p_photon.progress import progress_validators
from p2p_photon.runspec import RunSpec, serve
from p2p_photon.watchdog import stop_on_signals

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 60.0


def run_bootstrap(
    cfg: DHTConfig,
    *,
    maddrs_file: str | None,
    stop_event: threading.Event | None = None,
    on_ready: Callable[[hivemind.DHT], None] | None = None,
    spec: RunSpec | None = None,
) -> int:
    """Serve as a bootstrap node until SIGINT/SIGTERM or `stop_event`; return 0 after a clean stop.

    Raises NetworkError (one line, with the fix) when the node cannot start.
    """
    if cfg.client_mode:
        raise NetworkError("a bootstrap node cannot run in client mode: set dht.client_mode = false")
    if not cfg.identity_path:
        logger.warning("no dht.identity_path: the bootstrap peer ID will change on every restart")
    stop, server = stop_event or threading.Event(), None
    # the bootstrap stores progress records for others: it validates them like every peer does
    # peers reach it by its address, so it is public: libp2p then runs its relay for peers behind NAT
    # (dht.auto_relay) at once, without waiting for AutoNAT to confirm it
    if cfg.reachability == "auto":
        cfg = dataclasses.replace(cfg, reachability="public")
    dht = start_dht(cfg, client_mode=False, record_validators=progress_validators(cfg.run_id))
    try:
        with stop_on_signals(stop, "shutting down the bootstrap node"):
            info = describe(dht, cfg.run_id)
            print(info["initial_peers_arg"], flush=True)
            logger.info(
                f"bootstrap node {info['peer_id']} is up; give volunteers: {info['initial_peers_arg']}"
            )
            if maddrs_file:
                write_json_atomic(maddrs_file, info)
                logger.info(f"wrote multiaddrs to {maddrs_file}")
            if spec is not None:  # volunteers fetch the run's spec from here (and from every peer of the run)
                server = serve(dht, spec)
                print(f"hosting run {spec.run_id}: volunteers join with `p2p-photon peer "
                      f"{info['initial_peers_arg']} --data DIR`", flush=True)
            if on_ready is not None:
                on_ready(dht)
            return _serve(dht, stop)
    finally:
        if server is not None:
            server.stop()
        shutdown_dht(dht)
        logger.info("bootstrap node stopped")


def describe(dht: hivemind.DHT, run_id: str) -> dict:
    """What volunteers need: peer ID, multiaddrs and the ready-made --initial-peers argument."""
    maddrs = visible_maddrs(dht)
    return {
        "peer_id": dht.peer_id.to_base58(),
        "maddrs": maddrs,
        "initial_peers_arg": "--initial-peers " + " ".join(maddrs),
        "run_id": run_id,
    }


def _serve(dht: hivemind.DHT, stop: threading.Event) -> int:
    started = last_beat = time.monotonic()
    while not stop.wait(timeout=1.0):
        if not dht.is_alive():
            logger.error("the DHT process died; restart the bootstrap node")
            return 1
        if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
            last_beat = time.monotonic()
            logger.info(f"bootstrap alive | peers {count_peers(dht)} | up {_hms(last_beat - started)}")
    return 0


async def _connected_peers(_dht: hivemind.DHT, node: DHTNode) -> int:
    return len(await node.p2p.list_peers())


def count_peers(dht: hivemind.DHT) -> int | str:
    """Number of peers the node's p2pd is connected to ('?' if it cannot be read)."""
    try:
        return dht.run_coroutine(_connected_peers)
    except Exception as e:
        logger.debug(f"peer count unavailable: {e!r}")
        return "?"


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s"
