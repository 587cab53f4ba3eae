"""progress.py: the record schema, its DHT validator, and signed publication between real peers."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from pydantic import ValidationError

from p2p_photon.config import DHTConfig
from p2p_photon.network import shutdown_dht, start_dht, visible_maddrs
from p2p_photon.progress import (
    ProgressPublisher,
    ProgressRecord,
    ProgressValidator,
    fetch_progress,
    progress_key,
    progress_validators,
)
from tests.helpers import make_record, no_leaked_p2pd, wait_until

RUN = "prog-test"
LOCAL = ("/ip4/127.0.0.1/tcp/0",)


@pytest.fixture(autouse=True)
def _no_leaked_p2pd():
    with no_leaked_p2pd():
        yield


# ----------------------------------------------------------------------------- schema and validator (no DHT)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "changes",
    [
        dict(loss=math.nan),
        dict(loss=math.inf),
        dict(loss=-0.1),
        dict(samples=-1),
        dict(round=-1),
        dict(utilization=1.5),
        dict(tokens_per_s=-1.0),
        dict(state="sleeping"),
        dict(fingerprint="x" * 65),
        dict(theta_hash="y" * 65),
        dict(peer_id=""),
        dict(samples=64.0),
        dict(samples=True),
        dict(loss="3.2"),
        dict(samples=2**64),
        dict(extra_field=1),
    ],
)
def test_schema_rejects(changes):
    with pytest.raises(ValidationError):
        ProgressRecord.model_validate(make_record(**changes), strict=True)


@pytest.mark.timeout(10)
def test_schema_accepts_a_good_record_and_round_trips_msgpack():
    record = ProgressRecord(**make_record())
    again = ProgressRecord.model_validate(
        MSGPackSerializer.loads(MSGPackSerializer.dumps(record.model_dump())), strict=True
    )
    assert again == record
    local = ProgressRecord(**make_record(loss=np.float32(0.5), samples=np.int64(7)))  # lax when built locally
    assert (type(local.loss), type(local.samples)) == (float, int)
    with pytest.raises(ValidationError):
        ProgressRecord(**make_record(loss=math.nan))  # ... but never NaN


def _signed(validators, key: bytes, subkey, value, expiration: float | None = None) -> DHTRecord:
    """A DHT record as a storing node sees it: serialized and signed by `validators`."""
    record = DHTRecord(
        key,
        MSGPackSerializer.dumps(subkey),
        MSGPackSerializer.dumps(value),
        expiration or get_dht_time() + 60,
    )
    return dataclasses.replace(record, value=CompositeValidator(validators).sign_value(record))


@pytest.mark.timeout(30)
def test_validator_enforces_schema_owner_subkey_and_signature():
    mine, theirs = progress_validators(RUN, RSAPrivateKey()), progress_validators(RUN, RSAPrivateKey())
    composite = CompositeValidator(mine)
    key = DHTID.generate(source=progress_key(RUN)).to_bytes()
    my_pub, their_pub = mine[1].local_public_key, theirs[1].local_public_key
    assert composite.validate(_signed(mine, key, my_pub, make_record()))
    assert not composite.validate(_signed(mine, key, my_pub, make_record(loss=math.nan)))
    assert not composite.validate(_signed(mine, key, my_pub, make_record(samples=-5)))
    assert not composite.validate(_signed(mine, key, b"not-a-key", make_record()))  # unprotected subkey
    assert not composite.validate(_signed(mine, key, None, make_record()))  # a plain value, not a dict entry
    assert not composite.validate(_signed(mine, key, their_pub, make_record()))  # their subkey, unsigned
    forged = _signed(mine, key, my_pub, make_record())  # my signature pasted onto their subkey
    assert not composite.validate(dataclasses.replace(forged, subkey=MSGPackSerializer.dumps(their_pub)))
    other_key = DHTID.generate(source="something_else").to_bytes()
    assert ProgressValidator(RUN).validate(DHTRecord(other_key, b"", b"anything", 0.0))


@pytest.mark.timeout(10)
def test_publisher_needs_the_signing_validator():
    with pytest.raises(TypeError):
        ProgressPublisher(None, RUN, [ProgressValidator(RUN)])


# ----------------------------------------------------------------------------- real peers


@pytest.fixture
def swarm():
    """Two honest peers (schema + signature validators, own keys) and a rogue one (signature only)."""
    dhts, validators = [], []
    try:
        for i in range(3):
            v = (
                progress_validators(RUN, RSAPrivateKey())
                if i < 2
                else [RSASignatureValidator(RSAPrivateKey())]
            )
            initial = tuple(visible_maddrs(dhts[0])) if dhts else ()
            dhts.append(
                start_dht(
                    DHTConfig(run_id=RUN, host_maddrs=LOCAL, initial_peers=initial),
                    record_validators=v,
                    reaper=False,
                )
            )
            validators.append(v)
        yield dhts, validators
    finally:
        for dht in dhts:
            shutdown_dht(dht)


def _peers_seen(dht) -> set[str]:
    return {r.peer_id for r in fetch_progress(dht, RUN)[0]}


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_peers_see_each_other_and_cannot_overwrite_or_poison(swarm):
    (a, b, rogue), (va, vb, vr) = swarm
    pa, pb = ProgressPublisher(a, RUN, va), ProgressPublisher(b, RUN, vb)
    ida, idb = a.peer_id.to_base58(), b.peer_id.to_base58()
    assert pa.publish(ProgressRecord(**make_record(ida, loss=2.0)))
    assert pb.publish(ProgressRecord(**make_record(idb, loss=3.0, state="averaging")))
    for dht in (a, b):
        assert wait_until(lambda dht=dht: _peers_seen(dht) == {ida, idb}, 15), _peers_seen(dht)
    records, invalid = fetch_progress(a, RUN)
    assert invalid == 0 and {r.peer_id: r.loss for r in records} == {ida: 2.0, idb: 3.0}

    # b writes under a's subkey: b cannot sign for a's key, so every node refuses it
    forged = make_record(ida, loss=99.0)
    assert not b.store(progress_key(RUN), forged, expiration_time=get_dht_time() + 60, subkey=pa.subkey)
    for dht in (a, b):
        assert {r.peer_id: r.loss for r in fetch_progress(dht, RUN)[0]}[ida] == 2.0

    # the rogue peer signs a NaN-loss record correctly under its own key, bypassing ProgressPublisher:
    # honest nodes refuse to store it; the rogue's own node keeps it, and fetch_progress skips and counts it
    rogue_subkey = vr[0].local_public_key
    rogue.store(
        progress_key(RUN),
        make_record("rogue", loss=math.nan),
        expiration_time=get_dht_time() + 60,
        subkey=rogue_subkey,
    )
    rogue_view = rogue.get(progress_key(RUN), latest=True).value
    assert rogue_subkey in rogue_view  # it really is in the DHT (on the rogue's node)
    records, invalid = fetch_progress(rogue, RUN)
    assert invalid == 1 and "rogue" not in {r.peer_id for r in records}
    for dht in (a, b):
        records, invalid = fetch_progress(dht, RUN)
        assert invalid == 0 and {r.peer_id for r in records} == {ida, idb}


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_fetch_keeps_the_newest_record_of_a_restarted_peer(swarm):
    """A restarted peer signs with a new key, so its old record lingers until it expires."""
    (a, b, _), (va, vb, _) = swarm  # two keys standing in for before/after the restart
    assert ProgressPublisher(b, RUN, vb).publish(
        ProgressRecord(**make_record("same-peer", round=1, time=get_dht_time() - 10))
    )
    assert ProgressPublisher(a, RUN, va).publish(ProgressRecord(**make_record("same-peer", round=2)))
    assert wait_until(lambda: fetch_progress(b, RUN)[1] >= 1, 15)
    records, skipped = fetch_progress(b, RUN)
    assert [(r.peer_id, r.round) for r in records] == [("same-peer", 2)] and skipped == 1
