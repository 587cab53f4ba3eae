"""Closed swarms and robust round bookkeeping: who may publish, and how much one peer's claims count.

A peer's libp2p identity file (what `network.prepare_identity` writes) holds an RSA key; the
peer ID is the multihash of that key's public half. Signing progress records with the same
key ties every record to a peer ID that nobody else can claim: the DHT subkey
b"[owner:<ssh-rsa public key>]" (written by hivemind's RSASignatureValidator) maps to exactly
one peer ID (`owner_peer_id`), which a closed swarm checks against its members file.

`round_progress` and `swarm_ahead` are the pure functions the peer loop calls on the records
from `progress.fetch_progress`; they bound how far one peer's claims can move anybody else.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import multihash
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

if TYPE_CHECKING:
    from p2p_photon.progress import ProgressRecord

_OWNER_KEY = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


class TrustError(ValueError):
    """A one-line, user-facing error about identities or members files, naming the problem and the fix."""


# ----------------------------------------------------------------------------- members and identities


def load_members(path: str | Path) -> frozenset[str]:
    """Peer IDs (base58) from a members file: one per line, '#' starts a comment, blank lines allowed."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrustError(
            f"members file {p} not found: check dht.members (a file of peer IDs, one per line)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrustError(f"members file {p} cannot be read ({e}): point dht.members at a text file") from None
    members = set()
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            if not _is_peer_id(entry):
                raise TrustError(
                    f"members file {p}, line {n}: '{entry[:60]}' is not a peer ID: use the line that "
                    "`p2p-photon identity new` (or `identity show`) printed"
                )
            members.add(entry)
    if not members:
        raise TrustError(
            f"members file {p} lists no peer IDs: add one line per member (`p2p-photon identity show KEY` prints it)"
        )
    return frozenset(members)


def _is_peer_id(text: str) -> bool:
    try:
        raw = PeerID.from_base58(text).to_bytes()
        multihash.decode(raw)  # base58 alone accepts most short words
    except ValueError:
        return False
    return PeerID(raw).to_base58() == text


def signing_key_from_identity(path: str | Path) -> RSAPrivateKey:
    """The RSA key of a libp2p identity file, wrapped for RSASignatureValidator (records signed as this peer ID)."""
    p = Path(path).expanduser()
    try:
        proto = crypto_pb2.PrivateKey.FromString(p.read_bytes())
    except FileNotFoundError:
        raise TrustError(
            f"identity file {p} not found: create it with `p2p-photon identity new {p}`"
        ) from None
    except OSError as e:
        raise TrustError(
            f"identity file {p} cannot be read ({e.strerror}): check dht.identity_path"
        ) from None
    except Exception:
        raise TrustError(f"identity file {p} is not a libp2p private key: check dht.identity_path") from None
    if proto.key_type != crypto_pb2.RSA:
        kind = crypto_pb2.KeyType.Name(proto.key_type)
        raise TrustError(
            f"identity file {p} holds a {kind} key, but progress records are signed with RSA: create an RSA "
            "identity with `p2p-photon identity new NEW_PATH` (the peer ID will change)"
        )
    try:
        key = serialization.load_der_private_key(proto.data, password=None)
    except ValueError:
        key = None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TrustError(f"identity file {p} holds a damaged RSA key: restore it or create a new identity")
    wrapped = RSAPrivateKey.__new__(RSAPrivateKey)  # RSAPrivateKey() would generate a fresh key
    wrapped.__setstate__({"_private_key": proto.data})  # hivemind's own unpickling path (DER)
    return wrapped


@functools.lru_cache(maxsize=4096)
def owner_peer_id(subkey: bytes) -> str:
    """The peer ID (base58) of the RSA key in a b"[owner:<ssh-rsa key>]" subkey, derived as libp2p does.

    libp2p hashes the protobuf-wrapped DER (SubjectPublicKeyInfo) public key with sha2-256
    (keys of at most 42 bytes would be inlined, but no RSA key is that short), like
    hivemind's PeerID.from_identity.
    """
    match = _OWNER_KEY.fullmatch(subkey) if isinstance(subkey, bytes) else None
    if match is None:
        raise TrustError(f"subkey {subkey!r:.60} is not b'[owner:<ssh-rsa public key>]'")
    try:
        key = serialization.load_ssh_public_key(match.group(1))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, rsa.RSAPublicKey):
        raise TrustError("owner subkey does not hold an RSA public key")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    public = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(public).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def identity_new(path: str | Path) -> str:
    """Create a new identity file (mode 0600) and return its peer ID; never overwrites one."""
    from p2p_photon.network import prepare_identity

    p = Path(path).expanduser()
    if p.exists() or p.is_symlink():
        raise TrustError(
            f"{p} already exists: `p2p-photon identity show {p}` prints its peer ID; pick another path for a new one"
        )
    return prepare_identity(str(p))[1]


def identity_show(path: str | Path) -> str:
    """The peer ID of an existing identity file."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise TrustError(
            f"identity file {p} not found: create it with `p2p-photon identity new {p}`"
        ) from None
    except OSError as e:
        raise TrustError(f"identity file {p} cannot be read ({e.strerror}): check the path") from None
    try:
        return PeerID.from_identity(data).to_base58()
    except Exception:
        raise TrustError(f"{p} is not a libp2p RSA identity file: check the path") from None


# ----------------------------------------------------------------------------- round bookkeeping


def _others(records: Iterable[ProgressRecord], me: str, fingerprint: str) -> list[ProgressRecord]:
    """Records of the other live peers of this run."""
    return [r for r in records if r.peer_id != me and r.fingerprint == fingerprint and r.state != "done"]


def round_progress(
    records: Iterable[ProgressRecord],
    *,
    me: str,
    my_round: int,
    my_samples: int,
    fingerprint: str,
    now: float,
    seq_len: int,
    cap_vs_others: float,
    extrapolate_max_s: float = 10.0,
) -> float:
    """Estimated samples the swarm has trained in `my_round`: mine plus each other live peer's.

    Another peer's estimate is its reported samples plus, while it is training, what its
    reported rate (tokens_per_s / seq_len) adds since it published, for at most
    `extrapolate_max_s` seconds.

    The cap: records are signed, not true, so one peer could claim 100x the samples it
    trained (or an absurd rate) to end everybody's round early. Each other peer's estimate
    therefore counts at most `cap_vs_others` times the largest estimate among all the
    *other* counted peers, me included (my own samples count as they are). A lone liar
    cannot raise its own cap: with cap_vs_others = 1 its claim adds no more than the
    busiest honest peer's. A lone honest peer much faster than everybody else is
    undercounted the same way, which only makes the round end later than its target
    (more local steps), never earlier. The cap is applied after extrapolation, so it
    bounds a claimed rate too.
    """
    estimates = []
    for r in _others(records, me, fingerprint):
        if r.round != my_round:
            continue
        rate = r.tokens_per_s / seq_len if r.state == "training" else 0.0
        estimates.append(r.samples + rate * min(max(0.0, now - r.time), extrapolate_max_s))
    # the largest count among "the rest" is the overall largest, except for the peer holding it (runs
    # in the training loop every 0.2 s: two maxima instead of one max per peer)
    pool = [float(my_samples), *estimates]
    top = max(range(len(pool)), key=pool.__getitem__)
    first, second = pool[top], max((x for i, x in enumerate(pool) if i != top), default=0.0)
    return pool[0] + sum(min(e, cap_vs_others * (second if i == top else first))
                         for i, e in enumerate(pool) if i > 0)


def majority_round(rounds: list[int]) -> int:
    """The highest round that a strict majority of these peers has reached (-1 if there are none)."""
    return sorted(rounds, reverse=True)[len(rounds) // 2] if rounds else -1


def swarm_ahead(
    records: Iterable[ProgressRecord], *, me: str, my_round: int, fingerprint: str, max_rounds_ahead: int
) -> tuple[int | None, list[str]]:
    """(round to move on to, or None; reasons for the records that were ignored).

    Other live peers of this run claiming a round more than `max_rounds_ahead` past mine
    are ignored (and named in the reasons, for the log). If a strict majority of the rest
    is past my round, the result is the highest round R that such a majority has reached
    (more than half of them at rounds >= R); otherwise None. One peer alone cannot move a
    swarm of three; when every other peer is ignored, this peer is far behind and needs a
    state sync, not a round jump.
    """
    rounds, ignored = [], []
    for r in _others(records, me, fingerprint):
        if r.round > my_round + max_rounds_ahead:
            ignored.append(
                f"{r.peer_id[:16]} claims round {r.round}, more than {max_rounds_ahead} past ours ({my_round})"
            )
        else:
            rounds.append(r.round)
    reached = majority_round(rounds)
    return (reached if reached > my_round else None), ignored
