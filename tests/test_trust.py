"""trust.py: members files, identity keys as signing keys, closed swarms between real peers, and the
bounds on what one peer's progress claims can do to everybody else's round."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from p2p_photon.config import DHTConfig
from p2p_photon.network import shutdown_dht, start_dht, visible_maddrs
from p2p_photon.progress import (
    ProgressPublisher,
    ProgressRecord,
    fetch_progress,
    progress_key,
    progress_validators,
)
from p2p_photon.trust import (
    TrustError,
    identity_new,
    identity_show,
    load_members,
    owner_peer_id,
    signing_key_from_identity,
)
from tests.helpers import make_record, no_leaked_p2pd, wait_until

RUN = "trust-test"
LOCAL = ("/ip4/127.0.0.1/tcp/0",)
CLI = Path(sys.executable).with_name("p2p-photon")
# two real peer IDs (an RSA key's sha2-256 form and an Ed25519 key's inline form)
QM = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
KOO = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


@pytest.fixture(autouse=True)
def _no_leaked_p2pd():
    with no_leaked_p2pd():
        yield


# ----------------------------------------------------------------------------- members files


@pytest.mark.timeout(10)
def test_members_file_with_comments_blank_lines_and_duplicates(tmp_path):
    f = tmp_path / "members"
    f.write_text(f"# the swarm of 2024\n\n{QM}\n   {KOO}   # alice@laptop\n{QM}\n\n")
    assert load_members(f) == frozenset({QM, KOO})


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text, message",
    [
        (f"{QM}\nnot-a-peer-id\n", "line 2"),
        (f"# ok\n{QM} {KOO}\n", "line 2"),  # two IDs on one line
        ("abc\n", "line 1"),  # valid base58, but not a multihash
        (f"{QM[:-1]}\n", "line 1"),  # truncated
        ("# nobody yet\n\n", "no peer IDs"),
        ("", "no peer IDs"),
    ],
)
def test_members_file_errors_name_the_line(tmp_path, text, message):
    f = tmp_path / "members"
    f.write_text(text)
    with pytest.raises(TrustError, match=message) as e:
        load_members(f)
    assert "\n" not in str(e.value)


@pytest.mark.timeout(10)
def test_missing_members_file(tmp_path):
    with pytest.raises(TrustError, match="not found"):
        load_members(tmp_path / "nope")


# ----------------------------------------------------------------------------- identities as signing keys


@pytest.mark.timeout(30)
def test_identity_key_signs_as_its_peer_id(tmp_path):
    path = tmp_path / "id" / "key"
    peer_id = identity_new(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert peer_id == identity_show(path) == PeerID.from_identity(path.read_bytes()).to_base58()
    key = signing_key_from_identity(path)
    validator = RSASignatureValidator(key)
    assert owner_peer_id(validator.local_public_key) == peer_id
    assert key.get_public_key().verify(b"round 3", key.sign(b"round 3"))  # a working private key
    other = RSASignatureValidator(RSAPrivateKey()).local_public_key
    assert owner_peer_id(other) != peer_id
    with pytest.raises(TrustError, match="already exists"):
        identity_new(path)
    assert identity_show(path) == peer_id  # untouched


@pytest.mark.timeout(10)
def test_identity_files_that_cannot_sign(tmp_path):
    ed = tmp_path / "ed25519"
    ed.write_bytes(crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=b"\1" * 64).SerializeToString())
    with pytest.raises(TrustError, match="Ed25519"):
        signing_key_from_identity(ed)
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a key")
    for bad in (junk, tmp_path / "missing"):
        with pytest.raises(TrustError):
            signing_key_from_identity(bad)
        with pytest.raises(TrustError):
            identity_show(bad)
    for subkey in (
        b"[owner:not a key]",
        b"no owner",
        b"[owner:ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA]",
        "str",
    ):
        with pytest.raises(TrustError):
            owner_peer_id(subkey)


# ----------------------------------------------------------------------------- validator (no DHT)


def _signed(validators, subkey: bytes, value: dict) -> DHTRecord:
    """A DHT record as a storing node sees it: serialized and signed by `validators`."""
    key = DHTID.generate(source=progress_key(RUN)).to_bytes()
    record = DHTRecord(
        key, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), get_dht_time() + 60
    )
    return dataclasses.replace(record, value=CompositeValidator(validators).sign_value(record))


@pytest.mark.timeout(30)
def test_validator_checks_membership_and_binds_the_peer_id():
    member_key, outsider_key = RSAPrivateKey(), RSAPrivateKey()
    member_pub = RSASignatureValidator(member_key).local_public_key
    outsider_pub = RSASignatureValidator(outsider_key).local_public_key
    member, outsider = owner_peer_id(member_pub), owner_peer_id(outsider_pub)
    by_member = progress_validators(RUN, member_key)
    by_outsider = progress_validators(RUN, outsider_key)

    def accepted(validators, signer, subkey, peer_id):
        return CompositeValidator(validators).validate(_signed(signer, subkey, make_record(peer_id)))

    open_swarm = progress_validators(RUN, RSAPrivateKey())
    closed = progress_validators(RUN, RSAPrivateKey(), members=frozenset({member}))
    bound = progress_validators(RUN, RSAPrivateKey(), members=frozenset({member}), bind_peer_id=True)
    assert accepted(open_swarm, by_outsider, outsider_pub, "any name")  # the default: anyone, any name
    assert accepted(closed, by_member, member_pub, member)
    assert accepted(closed, by_member, member_pub, outsider)  # membership alone does not bind the name
    assert not accepted(closed, by_outsider, outsider_pub, outsider)
    assert not accepted(closed, by_outsider, outsider_pub, member)
    assert accepted(bound, by_member, member_pub, member)
    assert not accepted(bound, by_member, member_pub, outsider)
    assert not accepted(bound, by_outsider, outsider_pub, outsider)
    open_bound = progress_validators(RUN, RSAPrivateKey(), bind_peer_id=True)
    assert accepted(open_bound, by_outsider, outsider_pub, outsider)
    assert not accepted(open_bound, by_outsider, outsider_pub, member)


# ----------------------------------------------------------------------------- a closed swarm of real peers


@pytest.fixture
def start_peer():
    """start_peer(identity_path, validators) -> DHT joined to the first one started; all shut down after."""
    dhts = []

    def start(identity: Path, validators):
        initial = tuple(visible_maddrs(dhts[0])) if dhts else ()
        cfg = DHTConfig(
            run_id=RUN,
            host_maddrs=LOCAL,
            initial_peers=initial,
            identity_path=str(identity),
            startup_timeout=60,
        )
        dhts.append(start_dht(cfg, record_validators=validators, reaper=False))
        return dhts[-1]

    try:
        yield start
    finally:
        for dht in dhts:
            shutdown_dht(dht)


def _seen(dht, **checks) -> dict[str, float]:
    return {r.peer_id: r.loss for r in fetch_progress(dht, RUN, **checks)[0]}


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_closed_swarm_accepts_members_only(tmp_path, start_peer):
    paths = {name: tmp_path / name for name in ("a", "b", "outsider")}
    ids = {name: identity_new(p) for name, p in paths.items()}
    members = frozenset({ids["a"], ids["b"]})
    checks = dict(members=members, bind_peer_id=True)
    va = progress_validators(RUN, signing_key_from_identity(paths["a"]), **checks)
    vb = progress_validators(RUN, signing_key_from_identity(paths["b"]), **checks)
    a, b = start_peer(paths["a"], va), start_peer(paths["b"], vb)
    assert a.peer_id.to_base58() == ids["a"] == owner_peer_id(va[1].local_public_key)  # one key, one ID
    pa, pb = ProgressPublisher(a, RUN, va), ProgressPublisher(b, RUN, vb)

    assert pa.publish(ProgressRecord(**make_record(ids["a"], loss=2.0)))
    # b is a member, but signs with its own key: a record naming a is refused by both nodes
    assert not pb.publish(ProgressRecord(**make_record(ids["a"], loss=99.0, time=get_dht_time() + 1)))
    assert pb.publish(ProgressRecord(**make_record(ids["b"], loss=3.0)))
    expected = {ids["a"]: 2.0, ids["b"]: 3.0}
    for dht in (a, b):
        assert wait_until(lambda dht=dht: _seen(dht, **checks) == expected, 20), _seen(dht)

    # an outsider with a valid key and signature runs a node that accepts its own record
    vo = progress_validators(RUN, signing_key_from_identity(paths["outsider"]))
    outsider = start_peer(paths["outsider"], vo)
    # (publish() reports whichever replica answered last, so its value says nothing here)
    ProgressPublisher(outsider, RUN, vo).publish(ProgressRecord(**make_record(ids["outsider"], loss=1.0)))
    assert ids["outsider"] in _seen(outsider)  # it really is in the DHT, on the outsider's node
    assert ids["outsider"] not in _seen(outsider, **checks)  # ... and fetch_progress double-checks
    # the members' nodes refused it: a new member record arrives, the outsider's never does
    assert pa.publish(ProgressRecord(**make_record(ids["a"], loss=1.5)))
    for dht in (a, b):
        assert wait_until(lambda dht=dht: _seen(dht).get(ids["a"]) == 1.5, 20), _seen(dht)
        assert _seen(dht) == _seen(dht, **checks) == {ids["a"]: 1.5, ids["b"]: 3.0}


# ----------------------------------------------------------------------------- command line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
def test_cli_identity_new_and_show(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    r = run_cli("identity", "new", str(path))
    assert r.returncode == 0, r.stderr
    peer_id = PeerID.from_identity(path.read_bytes()).to_base58()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert f"peer ID: {peer_id}" in r.stdout
    members = tmp_path / "members"
    members.write_text(r.stdout.strip().splitlines()[-1] + "\n")  # the line printed for the operator
    assert load_members(members) == {peer_id}

    r = run_cli("identity", "show", str(path))
    assert (r.returncode, r.stdout) == (0, f"{peer_id}\n"), r.stderr

    before = path.read_bytes()
    for args in (("new", str(path)), ("show", str(tmp_path / "missing"))):
        r = run_cli("identity", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert path.read_bytes() == before
