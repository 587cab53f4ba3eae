"""Issue 5: the web dashboard, served by a Monitor fed with real signed DHT records, in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from p2p_photon.monitor import (
    Dashboard,
    Monitor,
    MonitorError,
    MonitorOptions,
    parse_http_address,
    serve_dashboard,
)
from tests.helpers import REPO_ROOT, free_port, wait_until

RUN = "dashboard-test"
LOCAL = ("/ip4/127.0.0.1/tcp/0",)
ARTIFACT = Path(REPO_ROOT) / "test-artifacts" / "dashboard.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--disable-crash-reporter", "--hide-scrollbars"]


def _get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.headers["Content-Type"], r.read()


@pytest.fixture(scope="module")
def fed_monitor():
    """Two in-process DHT peers publish a few rounds of signed records; a client-mode Monitor saw them all."""
    from hivemind.utils.crypto import RSAPrivateKey

    from p2p_photon.config import DHTConfig
    from p2p_photon.network import shutdown_dht, start_dht, visible_maddrs
    from p2p_photon.progress import ProgressPublisher, progress_validators
    from tests.helpers import no_leaked_p2pd

    dhts, monitor = [], None
    with no_leaked_p2pd(timeout=15):
        try:
            for _ in range(2):
                v = progress_validators(RUN, RSAPrivateKey())
                initial = tuple(visible_maddrs(dhts[0][0])) if dhts else ()
                cfg = DHTConfig(run_id=RUN, host_maddrs=LOCAL, initial_peers=initial)
                dhts.append((start_dht(cfg, record_validators=v, reaper=False), v))
            cfg = DHTConfig(run_id=RUN, initial_peers=tuple(visible_maddrs(dhts[0][0])))
            monitor = Monitor(MonitorOptions(run_id=RUN), dht_cfg=cfg)
            monitor.start(reaper=False)
            publishers = [(dht, ProgressPublisher(dht, RUN, v, expiration=600)) for dht, v in dhts]
            _publish_rounds(monitor, publishers)
            yield monitor
        finally:
            if monitor is not None:
                monitor.stop()
            for dht, _ in dhts:
                shutdown_dht(dht)


def _publish_rounds(monitor: Monitor, publishers: list, steps: int = 5) -> None:
    from hivemind.utils import get_dht_time

    from p2p_photon.progress import ProgressRecord
    from tests.helpers import make_record

    for step in range(steps):
        for i, (dht, pub) in enumerate(publishers):
            pid = dht.peer_id.to_base58()
            rec = ProgressRecord(**make_record(pid, round=step // 2, samples=16 * (step % 2 + 1), steps=step,
                                               total_samples=96 * (step // 2) + 32 * (step % 2 + 1),
                                               loss=5.0 - 0.4 * step - 0.1 * i, tokens_per_s=2000.0 + 300 * i,
                                               theta_hash=f"{step // 2:064x}", time=get_dht_time(),
                                               target_samples=96, seq_len=64))
            assert pub.publish(rec)

            def seen(pid=pid, t=rec.time) -> bool:
                monitor.poll_once()
                peers = monitor.swarm.peers
                return pid in peers and peers[pid].record.time == t

            assert wait_until(seen, timeout=20, interval=0.2), monitor.state()


# ----------------------------------------------------------------------------- HTTP routes


@pytest.mark.swarm
@pytest.mark.timeout(120)
def test_api_metrics_and_plot_routes(fed_monitor):
    dash = Dashboard(fed_monitor, "127.0.0.1", 0).start()
    try:
        ctype, body = _get(dash.url + "api/state")
        state = json.loads(body)
        assert ctype == "application/json" and len(state["peers"]) == 2 and state["invalid_records"] == 0
        assert {r["round"] for r in state["peers"]} == {2} and state["swarm"]["round"] == 2
        swarm = state["swarm"]
        assert swarm["theta_same"] is True and state["summary"].startswith("round 2 | samples 32/96 |")
        assert (swarm["target_samples"], swarm["seq_len"]) == (96, 64), "read from the records"
        ctype, body = _get(dash.url + "metrics")
        text = body.decode()
        assert ctype.startswith("text/plain") and "p2p_photon_swarm_alive_peers 2.0" in text
        assert "p2p_photon_swarm_target_samples 96.0" in text
        for row in state["peers"]:
            assert f'p2p_photon_peer_round{{peer="{row["peer"]}"}} 2.0' in text
            assert f'p2p_photon_peer_loss{{peer="{row["peer"]}"}}' in text
        ctype, body = _get(dash.url + "plot.png")
        assert ctype == "image/png" and body.startswith(b"\x89PNG")
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(dash.url + "nope")
        assert e.value.code == 404
    finally:
        dash.stop()


@pytest.mark.swarm
@pytest.mark.timeout(60)
def test_host_monitor_borrows_a_running_dht_and_leaves_it_running(fed_monitor, tmp_path):
    """What `p2p-photon bootstrap --monitor` does from its on_ready hook, on a DHT started like the bootstrap.

    run_bootstrap starts its DHT without record validators; host_monitor must add the signature
    validator, or hivemind's get of the signed records never returns.
    """
    from p2p_photon.config import DHTConfig
    from p2p_photon.monitor import host_monitor
    from p2p_photon.network import shutdown_dht, start_dht

    log = tmp_path / "hosted.jsonl"
    cfg = DHTConfig(run_id=RUN, host_maddrs=LOCAL, initial_peers=fed_monitor.dht_cfg.initial_peers)
    dht = start_dht(cfg, reaper=False)
    try:
        hosted = host_monitor(dht, run_id=RUN, http="127.0.0.1:0", log=str(log), interval=0.5)
        try:
            api = hosted.dashboard.url + "api/state"
            ok = wait_until(lambda: len(json.loads(_get(api)[1])["peers"]) == 2, 30)
            assert ok, hosted.monitor.state()
        finally:
            hosted.stop()
        assert dht.is_alive() and not hosted.monitor.polling
        with pytest.raises(urllib.error.URLError):
            _get(hosted.dashboard.url + "api/state")  # stopped with the monitor
    finally:
        shutdown_dht(dht)
    assert len({json.loads(line)["peer_id"] for line in log.read_text().splitlines()}) == 2


@pytest.mark.timeout(30)
def test_busy_port_and_bad_address_are_one_line_errors():
    monitor = Monitor(MonitorOptions(run_id="r"), dht=object())  # never polled: only the server is tested
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(MonitorError, match="already in use") as e:
            serve_dashboard(monitor, f"127.0.0.1:{s.getsockname()[1]}")
    assert "\n" not in str(e.value)
    assert parse_http_address(":8080") == ("127.0.0.1", 8080) == parse_http_address("8080")
    assert parse_http_address("[::1]:9") == ("::1", 9)
    for bad in ("127.0.0.1:http", "127.0.0.1:70000", ""):
        with pytest.raises(MonitorError):
            parse_http_address(bad)


# ----------------------------------------------------------------------------- real browser


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run scripts/_ensure_apt.sh chromium chromium browser-test (apt-get install chromium); "
                    "the dashboard must be checked in a real browser")
    return path


def _run_browser(args: list[str], profile: Path, timeout: float = 90) -> str:
    """Run headless Chromium in its own process group; kill the whole group if it hangs."""
    cmd = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    env = dict(os.environ, HOME=str(profile))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {timeout:.0f}s")
    assert proc.returncode == 0, err[-2000:]
    return out


@pytest.mark.swarm
@pytest.mark.timeout(240)
def test_dashboard_renders_peer_rows_in_headless_chromium(fed_monitor, tmp_path):
    dash = serve_dashboard(fed_monitor, f"127.0.0.1:{free_port()}")
    try:
        dom = _run_browser(["--dump-dom", dash.url], tmp_path / "profile")
        shots = tmp_path / "dashboard.png"
        _run_browser([f"--screenshot={shots}", "--window-size=1280,900", dash.url], tmp_path / "profile")
    finally:
        dash.stop()
    short_ids = [row["peer"] for row in fed_monitor.state()["peers"]]
    assert len(short_ids) == 2
    for short in short_ids:
        assert f'data-peer="{short}"' in dom, dom[:3000]
    assert dom.count('class="peer-row') == 2 and "round 2 |" in dom
    with Image.open(shots) as img:
        assert img.size == (1280, 900) and len(img.convert("RGB").getcolors(1 << 20) or []) > 50
    ARTIFACT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shots, ARTIFACT)
