"""Issue 15: volunteers behind NAT, on an emulated internet (scripts/netemu.py: network namespaces, a
public segment, home routers with nftables masquerade, tbf-shaped links) with real peer processes
(scripts/wan_swarm.py). Skipped, with the reason, where namespaces or nftables are not available."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PYTHON, REPO_ROOT, python_env

sys.path.insert(0, str(Path(REPO_ROOT) / "scripts"))
import netemu  # noqa: E402

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def internet_ok():
    why = netemu.why_unavailable()
    if why:
        pytest.skip(f"no emulated internet on this machine: {why}")


def _wan(tmp_path, data_cache, *args) -> dict:
    out = tmp_path / "wan.json"
    r = subprocess.run([PYTHON, str(Path(REPO_ROOT) / "scripts" / "wan_swarm.py"), *args, "--workdir",
                        str(tmp_path / "run"), "--out", str(out), "--cache-dir", str(data_cache)],
                       capture_output=True, text=True, env=python_env(), timeout=540)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


def test_two_peers_behind_nat_and_a_public_one_train_one_model(tmp_path, data_cache, internet_ok):
    """`wan_swarm.py --quick`: a public peer and two volunteers behind NAT on 100/20 Mbit home links,
    in client mode (they send their parts of Δ and receive the averages, owning no slice). The first
    NAT'd peer takes part in every round; the second joins late, downloads θ from the public peer (the
    only one that can serve it) through its NAT, then takes part; θ is identical on all three after
    every round. The NAT is real: a home host connects out and nobody outside can connect to it."""
    res = _wan(tmp_path, data_cache, "--quick")
    pub, home0, home1 = res["peers"]
    rounds = res["round_theta"]
    n = len(rounds)
    assert n == 8 and res["exit_codes"] == [0, 0, 0]
    assert home0["nat_verified"] and home1["nat_verified"] and pub["nat_verified"] is None
    assert home0["client_mode"] and home1["client_mode"] and not pub["client_mode"]
    assert [r["distinct_theta"] for r in rounds] == [1] * n, rounds  # one θ after every round
    assert res["one_theta_at_end"]
    assert pub["rounds_averaged"] == home0["rounds_averaged"] == n, (pub, home0)
    assert all(row["group"] >= 2 for row in home0["per_round"])  # it averaged with the public peer
    assert home1["late"] and home1["synced_at"] is not None and home1["synced_at"] >= 1, home1
    assert home1["rounds_averaged"] >= 1 and home1["per_round"][-1]["group"] == 3, home1
    assert home1["per_round"][-1]["theta"] == pub["per_round"][-1]["theta"]
    # a client sends its parts of Δ and gets the averages back: bytes on its wire, within its link
    assert home0["sent_per_round"] > 0 and home0["wire_sent"] >= home0["sent_per_round"]
    assert 0 < home0["uplink_fill"] <= 1.0, home0


def test_a_peer_behind_nat_is_reached_through_a_public_peers_relay(tmp_path, internet_ok):
    """dht.auto_relay: a DHT node behind NAT (nobody can connect to it) reserves a relay slot with the
    bootstrap nodes (public, so they relay; libp2p reserves once it knows 4 relay candidates), and a
    fresh public node that never talked to it reaches it through a /p2p-circuit address and calls it
    over that connection."""
    script = str(Path(REPO_ROOT) / "tests" / "relay_probe.py")
    with netemu.Internet() as net:
        boots = [net.public(f"boot{i}") for i in range(4)]
        home, probe = net.behind_nat("home", up_mbit=20, down_mbit=100), net.public("probe")
        assert not netemu.connects(probe, home)
        files = []
        for i, b in enumerate(boots):
            files.append(tmp_path / f"boot{i}.json")
            b.popen([PYTHON, "-m", "p2p_photon.cli", "bootstrap", "--host-maddrs", f"/ip4/{b.addr}/tcp/0",
                     "--maddrs-file", str(files[-1]), "--set", "dht.run_id=relay"], env=python_env(),
                    stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"boot{i}.log", "w"))
        for f in files:
            assert _wait_file(f), "a bootstrap node did not start"
        natted = home.popen([PYTHON, script, "natted", home.addr, *map(str, files)], env=python_env(),
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "natted.log", "w"), text=True)
        line = natted.stdout.readline().split()
        assert line and line[0] == "peer", (tmp_path / "natted.log").read_text()[-2000:]
        r = probe.run([PYTHON, script, "probe", probe.addr, line[1], *map(str, files)], env=python_env(),
                      capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ping_ok"], res
    assert res["connected_via"] and "/p2p-circuit/" in res["connected_via"], res
    assert res["addrs"] and all("/p2p-circuit" in a for a in res["addrs"]), res  # the only way in: the relay
    assert "reserving a relay slot" in (tmp_path / "natted.log").read_text()


def _wait_file(path: Path, timeout: float = 120.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
