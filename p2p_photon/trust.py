"""Closed swarms: identities, members files, and who may publish progress records.

A peer's libp2p identity file (what `network.prepare_identity` writes) holds an RSA key; the
peer ID is the multihash of that key's public half. Signing progress records with the same
key ties every record to a peer ID that nobody else can claim: the DHT subkey
b"[owner:<ssh-rsa public key>]" (written by hivemind's RSASignatureValidator) maps to exactly
one peer ID (`owner_peer_id`), which a closed swarm checks against its members file.

How far one peer's claims can move anybody else is bounded in `peer.tracker` (round_progress,
swarm_ahead), the pure arithmetic the peer applies to the records it reads.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import multihash
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from .errors import UsageError

_OWNER_KEY = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


class TrustError(UsageError, ValueError):
    """A one-line, user-facing error about identities or members files, naming the problem and the fix
    (exit code 2: the identity or members file given is unusable)."""


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
