"""Bounded calls into a hivemind DHT: a DHT whose process died (or hangs) must never hang the peer.

`hivemind.DHT.store/get` send the request to the DHT's child process and wait on the answer without
a deadline; when that process is gone (killed, or its p2pd reaped) the caller waited for ever —
seen: four peers stuck in their final progress record at shutdown, SIGTERM unanswered, after their
DHT processes had exited. Every call from the peer's main process goes through `dht_call`.
"""

from __future__ import annotations

from typing import Any

from p2p_photon.errors import UserError

DHT_CALL_TIMEOUT = 60.0  # far above a healthy call (hivemind's own RPC timeouts are a few seconds)


class DHTUnavailable(UserError):
    """The DHT's process exited: nothing that needs the swarm can go on (the peer leaves with its
    last checkpoint; restart it with --resume)."""


def _alive(dht) -> bool:
    try:
        return dht.is_alive()
    except (AssertionError, ValueError):  # not our child (another process holds the handle): assume alive
        return True


def _dead(dht) -> DHTUnavailable:
    code = getattr(dht, "exitcode", None)
    return DHTUnavailable(f"the DHT process has exited (exit code {code}): this peer cannot reach the swarm; "
                          "restart it with --resume to continue from its last checkpoint")


def dht_call(dht, method: str, *args, timeout: float = DHT_CALL_TIMEOUT, slow: type[Exception] = TimeoutError,
             **kwargs) -> Any:
    """`dht.<method>(*args, **kwargs)` that returns within `timeout` seconds: raises DHTUnavailable if the
    DHT's process is not running, or `slow` if a live DHT did not answer in time."""
    if not _alive(dht):
        raise _dead(dht)
    future = getattr(dht, method)(*args, return_future=True, **kwargs)
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        if not _alive(dht):
            raise _dead(dht) from None
        raise slow(f"the DHT did not answer a {method} within {timeout:g} s") from None
