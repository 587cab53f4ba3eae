"""Did every member of the group end up with the same average? Each member publishes the hash of its
average under a key unique to the group formed, then reads the others' before anything is applied.

hivemind keeps a member's own values for a slice whose owner died mid-all-reduce, and a dishonest
owner could send different bytes to different members: either way the hashes differ and the round
fails for everyone who sees it. A member whose contribution an owner refused (proof: non-finite values,
a wrong size, a weight above its cap) is named by that owner under the same key and its hash is not
waited for: the owners left it out, the others' result is the same, and the round succeeds for them.
Only the DHT's public `store`/`get` are used.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Set
from typing import Any

from hivemind.utils import get_dht_time

from ..dhtcall import dht_call
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


def verdict(mine: str, theirs: Mapping[str, str | None], final: bool = False) -> str:
    """Once every member has published (or, `final`, when we stop waiting): 'differ' if any published
    another hash than ours, else 'agree'; 'pending' before. Not earlier: an owner names the members it
    refused before it publishes its own hash, so a refused member's hash is only known to be ignorable
    once all the others are in."""
    if not final and any(h is None for h in theirs.values()):
        return "pending"
    return "differ" if any(h is not None and h != mine for h in theirs.values()) else "agree"


REFUSED = ":refused"  # subkey suffix: the members whose data a member's owner role refused this round


def publish(dht, key: str, peer_id: str, value: str) -> None:
    """Our hash of the average under our subkey."""
    dht_call(dht, "store", key, subkey=peer_id, value=value, expiration_time=get_dht_time() + HASH_TTL,
             slow=AveragingFailed)


def publish_refused(dht, key: str, peer_id: str, refused: list[str]) -> None:
    """Tell the group whose contributions we refused as an owner: their hashes do not count (a refused
    sender is out of the round; whatever it says about the average must not fail it for the others)."""
    dht_call(dht, "store", key, subkey=peer_id + REFUSED, value=",".join(sorted(refused)),
             expiration_time=get_dht_time() + HASH_TTL, slow=AveragingFailed)


def read_hashes(dht, key: str, peers: Mapping[str, Any], me: str, ignore: Set[str] = frozenset()
                ) -> dict[str, str | None]:
    """The hash each other member published so far (None: not yet), without the members refused by
    any member (or in `ignore`)."""
    found = dht_call(dht, "get", key, latest=True, slow=AveragingFailed)
    seen = {}
    if found is not None and isinstance(found.value, dict):
        seen = {k: v.value for k, v in found.value.items()}
    refused = set(ignore)
    for subkey, value in seen.items():
        if isinstance(subkey, str) and subkey.endswith(REFUSED) and isinstance(value, str):
            refused.update(value.split(","))
    return {p: seen.get(p) for p in peers if p != me and p not in refused}


def verify(dht, key: str, peers: Mapping[str, Any], me: str, mine: str, timeout: float,
           ignore: Set[str] = frozenset()) -> None:
    """Wait until every other member (less the refused ones) published the same hash as ours; raise
    AveragingFailed if one differs. Members silent for `timeout` seconds probably left the group: the
    others' agreement is enough, and the silent ones are logged."""
    deadline = time.monotonic() + timeout
    while True:
        theirs = read_hashes(dht, key, peers, me, ignore)
        final = time.monotonic() > deadline
        state = verdict(mine, theirs, final)
        if state == "differ":
            raise AveragingFailed("group members hold different averages (a peer dropped out mid-all-reduce)")
        if state == "agree":
            missing = [p[-8:] for p, h in theirs.items() if h is None]
            if missing:
                logger.info("no average hash from %s (left the group?); the others agree", ", ".join(missing))
            return
        time.sleep(POLL_INTERVAL)
