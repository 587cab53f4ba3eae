"""Did every member of the group end up with the same average? Each member publishes the hash of its
average under a key unique to the group formed, then reads the others' before anything is applied.

hivemind keeps a member's own values for a slice whose owner died mid-all-reduce, and a dishonest
owner could send different bytes to different members: either way the hashes differ and the round
fails for everyone who sees it. Only the DHT's public `store`/`get` are used.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from hivemind.utils import get_dht_time

from .protocol import AveragingFailed

logger = logging.getLogger(__name__)

HASH_TTL = 120.0  # seconds a published hash stays in the DHT: long after every member has read it
POLL_INTERVAL = 0.1


def group_key(prefix: str, round_no: int, peers: Mapping[str, Mapping[str, Any]]) -> str:
    """One DHT key per group formed (not per round: a round may form several groups), from the random
    nonces its members sent in their metadata, so every member derives the same key."""
    nonces = "".join(sorted(str(m.get("nonce")) for m in peers.values()))
    group_id = hashlib.sha256(nonces.encode()).hexdigest()
    return f"{prefix}_consensus_{round_no}_{group_id[:16]}"


def verdict(mine: str, theirs: Mapping[str, str | None]) -> str:
    """'differ' if any member published another hash, 'agree' once all have published ours,
    'pending' while some have not published yet."""
    if any(h is not None and h != mine for h in theirs.values()):
        return "differ"
    if all(h is not None for h in theirs.values()):
        return "agree"
    return "pending"


def publish(dht, key: str, peer_id: str, value: str) -> None:
    """Our hash (or a 'rejected:...' marker that fails the round for the group) under our subkey."""
    dht.store(key, subkey=peer_id, value=value, expiration_time=get_dht_time() + HASH_TTL)


def read_hashes(dht, key: str, peers: Mapping[str, Any], me: str) -> dict[str, str | None]:
    """The hash each other member published so far (None: not yet)."""
    found = dht.get(key, latest=True)
    seen = {}
    if found is not None and isinstance(found.value, dict):
        seen = {k: v.value for k, v in found.value.items()}
    return {p: seen.get(p) for p in peers if p != me}


def verify(dht, key: str, peers: Mapping[str, Any], me: str, mine: str, timeout: float) -> None:
    """Wait until every other member published the same hash as ours; raise AveragingFailed if one
    differs. Members silent for `timeout` seconds probably left the group: the others' agreement is
    enough, and the silent ones are logged."""
    deadline = time.monotonic() + timeout
    while True:
        theirs = read_hashes(dht, key, peers, me)
        state = verdict(mine, theirs)
        if state == "differ":
            raise AveragingFailed("group members hold different averages (a peer dropped out mid-all-reduce)")
        if state == "agree":
            return
        if time.monotonic() > deadline:
            missing = [p[-8:] for p, h in theirs.items() if h is None]
            logger.info("no average hash from %s (left the group?); the others agree", ", ".join(missing))
            return
        time.sleep(POLL_INTERVAL)
