"""Roles for tests/test_nat.py's relay test, run inside network namespaces (`python tests/relay_probe.py ROLE`).

    natted BOOT.json…      a DHT node behind NAT with dht.auto_relay (the product's start_dht): prints
                           'peer <id>' and serves until killed
    probe ID BOOT.json…    a fresh public DHT node that has never talked to ID: connects to it only through
                           /p2p-circuit addresses of the bootstrap nodes and pings it over that connection;
                           prints one JSON line {connected_via, ping_ok, addrs}
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2p_photon.config import DHTConfig  # noqa: E402
from p2p_photon.network import shutdown_dht, start_dht  # noqa: E402


def _boots(files: list[str]) -> list[str]:
    return [json.loads(Path(f).read_text())["maddrs"][0] for f in files]


async def _probe(_dht, node, peer: str, circuits: list[str]) -> dict:
    from hivemind.p2p import PeerID
    from multiaddr import Multiaddr

    pid, out = PeerID.from_base58(peer), dict(connected_via=None, ping_ok=False, errors=[])
    for c in circuits:
        try:
            await node.p2p._client.connect(pid, [Multiaddr(c)])
            out["connected_via"] = c
            break
        except Exception as e:  # noqa: BLE001 - reported
            out["errors"].append(repr(e)[:160])
    try:
        out["ping_ok"] = await node.protocol.call_ping(pid, validate=False) is not None
    except Exception as e:  # noqa: BLE001 - reported
        out["errors"].append(repr(e)[:160])
    out["addrs"] = [str(a) for p in await node.p2p.list_peers() if p.peer_id == pid for a in p.addrs]
    return out


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    role, host = sys.argv[1], sys.argv[2]
    if role == "natted":
        boots = _boots(sys.argv[3:])
        dht = start_dht(DHTConfig(run_id="relay", initial_peers=tuple(boots), auto_relay=True,
                                  host_maddrs=(f"/ip4/{host}/tcp/0",)), reaper=False)
        print(f"peer {dht.peer_id.to_base58()}", flush=True)
        try:
            time.sleep(600)
        finally:
            shutdown_dht(dht)
        return 0
    peer, boots = sys.argv[3], _boots(sys.argv[4:])
    dht = start_dht(DHTConfig(run_id="relay", initial_peers=(boots[0],), host_maddrs=(f"/ip4/{host}/tcp/0",)),
                    reaper=False)
    try:
        circuits = [f"{b}/p2p-circuit/p2p/{peer}" for b in boots]
        deadline, res = time.monotonic() + 60, {}
        while time.monotonic() < deadline:  # the reservation is made a few seconds after the peer started
            res = dht.run_coroutine(functools.partial(_probe, peer=peer, circuits=circuits))
            if res["ping_ok"]:
                break
            time.sleep(2)
        print(json.dumps(res), flush=True)
    finally:
        shutdown_dht(dht)
    return 0


if __name__ == "__main__":
    sys.exit(main())
