"""Signed, schema-validated progress records in the DHT (one per peer, under one key per run).

Like hivemind's ProgressTracker: every peer stores its record under the key
f"{run_id}_progress" with its RSA public key as the subkey. `RSASignatureValidator` makes
that subkey writable only by the holder of the private key; `ProgressValidator` makes every
DHT node refuse, store-side and fetch-side, values that do not match `ProgressRecord`.

hivemind's own SchemaValidator is written against `pydantic.v1` (it patches `__fields__`
and `Config.extra`), so it cannot take a pydantic v2 model; `ProgressValidator` is a small
RecordValidatorBase that validates with pydantic v2 in strict mode (no type coercion: an
int is not accepted for a str, a float not for an int, NaN/inf never).

The record also carries `theta_hash`, the hash of the global model at the start of the
round, so the swarm can check that everybody averaged into the same θ.

Closed swarms (see trust.py): with `members`, only records whose owner key hashes to a
member's peer ID are accepted; with `bind_peer_id`, a record's `peer_id` field must be the
owner key's own peer ID, so nobody can publish under another peer's name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Annotated, Literal

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from p2p_photon.dhtcall import dht_call
from p2p_photon.trust import TrustError, owner_peer_id

logger = logging.getLogger(__name__)

MAX_INT = 2**63 - 1  # what msgpack (and every peer) can represent
MAX_RECORD_BYTES = 4096  # a serialized record is ~400 bytes; anything far larger is junk
_OWNER_KEY = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)

Count = Annotated[int, Field(ge=0, le=MAX_INT)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
ShortStr = Annotated[str, Field(max_length=64)]


MAX_BANS, MAX_BAN_CHARS = 8, 200


def ban_entries(banned: dict[str, str]) -> list[str]:
    """A peer's bans as its progress record carries them (the newest MAX_BANS, each cut to fit)."""
    return [f"{p}: {why}"[:MAX_BAN_CHARS] for p, why in list(banned.items())[-MAX_BANS:]]


class ProgressRecord(BaseModel):
    """What one peer tells the swarm about its current round.

    Built locally in lax mode (numpy scalars and ints for floats are converted); checked
    on the wire in strict mode (see parse_record), where no conversion is accepted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer_id: Annotated[str, Field(min_length=1, max_length=128)]
    round: Count
    samples: Count
    """Sequences trained in this round."""
    steps: Count
    """Local optimizer steps in this round."""
    total_samples: Count
    loss: NonNegative
    tokens_per_s: NonNegative
    fingerprint: ShortStr
    theta_hash: ShortStr
    """Hash of the global model at this round's start."""
    failed_rounds: Count
    bytes_sent: Count
    bytes_received: Count
    utilization: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
    time: Annotated[float, Field(allow_inf_nan=False)]
    """Unix seconds (hivemind.get_dht_time())."""
    state: Literal["training", "averaging", "syncing", "done"]
    since: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    """DHT time at which this peer entered `state` for `round` (0: not said). A joiner reads it to tell a
    round whose groups formed long ago from one it can still join (tracker.groups_formed)."""
    target_samples: Count = 0
    """The run's rounds.target_samples_per_round (part of the fingerprint, so every peer of the run
    agrees on it); the monitor reads it from here. 0 from a peer that did not say."""
    seq_len: Count = 0
    """The run's model.seq_len (part of the fingerprint): tokens per sample."""
    theta_round: Count = 0
    """The round of the global model whose hash is `theta_hash` (= `round`, except in overlapped mode,
    where a peer trains round r+1 while it holds θ of round r): peers compare hashes per θ round."""
    eval_loss: NonNegative | None = None
    """Held-out loss of the global model of θ round `eval_round` on the run's public eval set (the same
    for every peer of a run, so the swarm has one comparable number); None before the first evaluation."""
    eval_round: Count = 0
    client: bool = False
    """The peer accepts no connections (dht.client_mode, e.g. behind NAT): it averages as a member of
    groups that others lead, so client-mode peers alone cannot average."""
    bans: Annotated[list[Annotated[str, Field(max_length=MAX_BAN_CHARS)]], Field(max_length=MAX_BANS)] = []
    """The peers this one refused data from and left out of its all-reduces, newest last, each
    "<peer id>: <why>" (only on proof: non-finite values, wrong sizes, a weight above its cap)."""


def progress_key(run_id: str) -> str:
    return f"{run_id}_progress"


class ProgressValidator(RecordValidatorBase):
    """Accept under f"{run_id}_progress" only {owner public key: ProgressRecord dict} entries.

    Records under other keys pass untouched (other validators judge them). Runs after
    RSASignatureValidator (lower priority), so it sees the value with the signature stripped.
    With `members` or `bind_peer_id` it also checks the owner key (see owner_problem).
    """

    def __init__(self, run_id: str, members: frozenset[str] | None = None, bind_peer_id: bool = False):
        self.run_id, self.members, self.bind_peer_id = run_id, members, bind_peer_id
        self._key_id = DHTID.generate(source=progress_key(run_id)).to_bytes()

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self._key_id:
            return True
        try:
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
            if not is_owner_subkey(subkey):
                logger.debug(f"{progress_key(self.run_id)}: subkey is not an owner public key")
                return False
            problem = owner_problem(subkey, parse_record(record.value), self.members, self.bind_peer_id)
            if problem:
                raise ValueError(problem)
        except (ValidationError, ValueError, TypeError) as e:
            logger.debug(f"rejected a {progress_key(self.run_id)} record: {e}")
            return False
        return True


def is_owner_subkey(subkey: object) -> bool:
    """True for a subkey of the form b"[owner:<RSA public key>]" (what RSASignatureValidator protects)."""
    return isinstance(subkey, bytes) and _OWNER_KEY.fullmatch(subkey) is not None


def owner_problem(
    subkey: bytes, record: ProgressRecord, members: frozenset[str] | None, bind_peer_id: bool
) -> str | None:
    """Why the owner of `subkey` may not publish `record` in this swarm, or None if it may."""
    if members is None and not bind_peer_id:
        return None
    try:
        owner = owner_peer_id(subkey)
    except TrustError as e:
        return str(e)
    if members is not None and owner not in members:
        return f"owner {owner} is not a member of this swarm"
    if bind_peer_id and record.peer_id != owner:
        return f"record names peer {record.peer_id[:60]} but is signed by {owner}"
    return None


def parse_record(value: bytes | dict) -> ProgressRecord:
    """ProgressRecord from msgpack bytes (or an already decoded dict); raises ValueError."""
    if isinstance(value, bytes):
        if len(value) > MAX_RECORD_BYTES:
            raise ValueError(f"record of {len(value)} bytes is larger than {MAX_RECORD_BYTES}")
        value = MSGPackSerializer.loads(value)
    return ProgressRecord.model_validate(value, strict=True)


def progress_validators(
    run_id: str,
    private_key: RSAPrivateKey | None = None,
    members: frozenset[str] | None = None,
    bind_peer_id: bool = False,
) -> list[RecordValidatorBase]:
    """Validators to pass to start_dht(record_validators=...); the RSA one holds this peer's key.

    private_key defaults to hivemind's process-wide key (one peer per process); give each
    peer its own key when several share a process (tests). In a closed swarm pass the key of
    the peer's identity file (trust.signing_key_from_identity), the members
    (trust.load_members) and bind_peer_id=True, so that records carry the peer's own ID.
    """
    return [ProgressValidator(run_id, members, bind_peer_id), RSASignatureValidator(private_key)]


class ProgressPublisher:
    """Stores this peer's ProgressRecord under its own (signed) subkey."""

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        validators: Sequence[RecordValidatorBase],
        *,
        expiration: float = 60.0,
    ):
        signers = [v for v in validators if isinstance(v, RSASignatureValidator)]
        if not signers:
            raise TypeError("ProgressPublisher needs the validators from progress_validators(run_id)")
        self.dht, self.key, self.expiration = dht, progress_key(run_id), expiration
        self.subkey = signers[0].local_public_key

    def publish(self, record: ProgressRecord) -> bool:
        """Store `record` until now + expiration; True if the DHT reports it stored.

        hivemind reports the answer of the replica that answered last, so False can also mean
        that some nodes stored it and the last one refused.
        """
        try:
            return bool(
                dht_call(
                    self.dht,
                    "store",
                    self.key,
                    record.model_dump(),
                    expiration_time=get_dht_time() + self.expiration,
                    subkey=self.subkey,
                )
            )
        except Exception as e:
            logger.warning(f"could not publish progress: {e!r}")
            return False


def fetch_progress(
    dht: hivemind.DHT, run_id: str, members: frozenset[str] | None = None, bind_peer_id: bool = False
) -> tuple[list[ProgressRecord], int]:
    """(valid records, newest per peer_id; number of invalid or superseded entries skipped).

    `members` and `bind_peer_id` repeat the validator's checks (the validator is the
    authority; this also covers what a DHT node started without those checks holds).
    """
    found = dht_call(dht, "get", progress_key(run_id), latest=True)
    if found is None or not isinstance(found.value, dict):
        return [], 0 if found is None else 1
    newest: dict[str, ProgressRecord] = {}
    skipped = 0
    for subkey, entry in found.value.items():
        try:
            if not is_owner_subkey(subkey):
                raise ValueError("subkey is not an owner public key")
            record = parse_record(entry.value)
            problem = owner_problem(subkey, record, members, bind_peer_id)
            if problem:
                raise ValueError(problem)
        except (ValidationError, ValueError, TypeError):
            skipped += 1
            continue
        old = newest.get(record.peer_id)
        if old is not None:
            skipped += 1  # a restarted peer has a new key: keep its latest record only
            if old.time >= record.time:
                continue
        newest[record.peer_id] = record
    return sorted(newest.values(), key=lambda r: r.peer_id), skipped
