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
    majority_round,
    owner_peer_id,
    round_progress,
    signing_key_from_identity,
    swarm_ahead,
)
from tests.helpers import no_leaked_p2pd, wait_until
from tests.test_progress import make_record

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


# ----------------------------------------------------------------------------- round bookkeeping (pure)

FP = "ab12" * 4
NOW = 1000.0
SEQ = 64


def rec(peer_id: str, **changes) -> ProgressRecord:
    base = dict(round=5, samples=0, tokens_per_s=0.0, state="averaging", time=NOW, fingerprint=FP)
    return ProgressRecord(**make_record(peer_id, **{**base, **changes}))


def progress(records, my_samples: int, cap: float = 1.0) -> float:
    return round_progress(
        records,
        me="me",
        my_round=5,
        my_samples=my_samples,
        fingerprint=FP,
        now=NOW,
        seq_len=SEQ,
        cap_vs_others=cap,
    )


@pytest.mark.timeout(10)
def test_round_progress_hand_computed():
    records = [
        rec("me", samples=999),  # my own record: my_samples counts instead
        rec("p1", samples=100, state="training", tokens_per_s=10.0 * SEQ, time=NOW - 5),  # 100 + 10/s * 5 s
        rec("p2", samples=200, state="averaging", tokens_per_s=640.0, time=NOW - 5),  # not training: 200
        rec("p3", samples=50, state="training", tokens_per_s=10.0 * SEQ, time=NOW - 100),  # at most 10 s: 150
        rec("p4", samples=70, state="training", tokens_per_s=10.0 * SEQ, time=NOW + 3),  # clock ahead: 70
        rec("old", round=4, samples=500),
        rec("next", round=6, samples=500),
        rec("gone", samples=500, state="done"),
        rec("other-run", samples=500, fingerprint="ffff"),
    ]
    # with cap 1, each peer counts at most as much as the largest of the rest: p2's 200 counts as 150
    assert progress(records, my_samples=120) == 120 + 150 + 150 + 150 + 70
    assert progress(records, my_samples=120, cap=2.0) == 120 + 150 + 200 + 150 + 70
    assert progress([], my_samples=7) == 7.0
    # p2 (200) against a cap of 1 x max(120, 150, 150, 70) = 150
    assert progress(records[:3], my_samples=120) == 120 + 150 + 150


@pytest.mark.timeout(10)
def test_one_peer_claiming_100x_cannot_end_the_round():
    target, honest = 1000, 100
    liar = [rec("honest", samples=honest), rec("liar", samples=100 * honest)]
    # the liar counts at most as much as the largest of the rest (100): 100 + 100 + 100 = the true total
    assert progress(liar, my_samples=honest) == 300 < target
    fast = [
        rec("honest", samples=honest),
        rec("liar", samples=honest, state="training", tokens_per_s=1e12, time=NOW - 5),
    ]
    assert progress(fast, my_samples=honest) == 300 < target  # an absurd rate is capped the same way
    assert progress([rec("liar", samples=100 * honest)], my_samples=honest) == 200  # of two, mine bounds it
    assert progress(liar, my_samples=honest, cap=2.0) == 400
    assert progress(liar, my_samples=honest, cap=1e9) > target  # without the cap it would end the round
    everyone = [rec(f"p{i}", samples=honest) for i in range(9)]
    assert progress(everyone, my_samples=honest) == 10 * honest  # honest peers are not capped


def ahead(rounds: list[int], my_round: int = 5, max_ahead: int = 2, extra=()):
    records = [rec(f"p{i}", round=r) for i, r in enumerate(rounds)] + list(extra)
    return swarm_ahead(records, me="me", my_round=my_round, fingerprint=FP, max_rounds_ahead=max_ahead)


@pytest.mark.timeout(10)
def test_swarm_ahead_needs_a_majority():
    r = 5
    assert ahead([r, r + 1]) == (None, [])  # a swarm of 3: one peer ahead moves nobody
    round_, reasons = ahead([r, r + 10**6])
    assert round_ is None and len(reasons) == 1 and str(r + 10**6) in reasons[0]
    assert ahead([r, r + 2]) == (None, [])
    assert ahead([r + 1, r + 1]) == (r + 1, [])  # two of three
    assert ahead([r + 1, r + 2]) == (r + 1, [])  # both passed r + 1, only one reached r + 2
    assert ahead([r + 2, r + 2, r + 2, r + 1, r]) == (r + 2, [])
    assert ahead([r + 1, r + 1, r + 2, r, r]) == (r + 1, [])
    assert ahead([r + 1, r + 1, r, r]) == (None, [])  # half is not a majority
    assert ahead([r + 1]) == (r + 1, [])  # a swarm of two: the other peer finished the round
    assert ahead([]) == (None, [])
    not_counted = [
        rec("me", round=r + 1),
        rec("gone", round=r + 1, state="done"),
        rec("other-run", round=r + 1, fingerprint="ffff"),
    ]
    assert ahead([r], extra=not_counted) == (None, [])
    round_, reasons = ahead([r + 3, r + 3, r + 3])  # everybody far ahead: a state sync, not a jump
    assert round_ is None and len(reasons) == 3
    # the join / catch-up rule (no far-ahead filter): the highest round a strict majority has reached
    assert majority_round([5, 5, 10**6]) == 5 and majority_round([3, 9]) == 3
    assert majority_round([1, 2, 3, 4]) == 2 and majority_round([]) == -1


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
