"""The one place that starts a hivemind DHT: address validation, identity files, retries, cleanup.

`start_dht` turns a `DHTConfig` into a running `hivemind.DHT` or raises `NetworkError`, a
one-line message naming the problem and the fix. What hivemind 1.1.12 does on the way:

* an unreachable initial peer makes p2pd exit at once ("failed to connect to bootstrap
  peers"), so we retry with backoff until `bootstrap_timeout`;
* a busy TCP port is only an error when the other listener did not set SO_REUSEPORT; two
  p2pd daemons happily share a port, so we check that host ports are free ourselves;
* a new identity file is written with mode 0400; we write it 0600 inside a private
  temporary directory and link it into place, so the key is never readable by others.

Every attempt tags its p2pd through the environment, so whatever is left of a failed start
(or of a shutdown that timed out) is found and ended even after it was re-parented.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import hivemind
import multiaddr
import psutil
from hivemind.p2p import P2P, PeerID

from p2p_photon.config import DHTConfig
from p2p_photon.watchdog import notify_reaper, reap, start_orphan_reaper

from .errors import UserError

logger = logging.getLogger(__name__)

DHT_TAG_ENV = "P2P_PHOTON_DHT"
"""Environment variable that marks the p2pd processes of one DHT (inherited at exec)."""
EXAMPLE_PEER = "/ip4/127.0.0.1/tcp/31337/p2p/12D3Koo..."

_tags: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class NetworkError(UserError):
    """A one-line, user-facing networking error naming the problem and the fix."""


class _Unreachable(Exception):
    """None of the initial peers answered (retryable)."""


# ----------------------------------------------------------------------------- addresses


def validate_maddrs(addrs: Sequence[str], what: str, *, require_peer_id: bool = False) -> tuple[str, ...]:
    """Parse every multiaddr; `what` names the option in errors (e.g. '--initial-peers')."""
    if isinstance(addrs, str):
        addrs = (addrs,)
    out = []
    for addr in addrs:
        text = str(addr).strip()
        example = EXAMPLE_PEER if require_peer_id else "/ip4/127.0.0.1/tcp/31337"
        try:
            parsed = multiaddr.Multiaddr(text)
            names = [p.name for p in parsed.protocols()]
        except Exception:
            names = []
        if not names:
            raise NetworkError(f"{what}: '{text}' is not a valid multiaddr (expected e.g. {example})")
        if require_peer_id and "p2p" not in names:
            raise NetworkError(
                f"{what}: '{text}' has no /p2p/<peer id> part (expected e.g. {EXAMPLE_PEER}; "
                "copy the full address the bootstrap node prints)"
            )
        if not require_peer_id and "p2p" in names:
            raise NetworkError(f"{what}: '{text}' must not contain a /p2p/ peer id (expected e.g. {example})")
        out.append(text)
    return tuple(out)


def _ip_port(addr: str) -> tuple[str, str, int] | None:
    """(ip, 'tcp'|'udp', port) of a multiaddr with an IP and a port, else None."""
    m = multiaddr.Multiaddr(addr)
    names = [p.name for p in m.protocols()]
    ip_proto = next((n for n in names if n in ("ip4", "ip6")), None)
    transport = next((n for n in names if n in ("tcp", "udp")), None)
    if ip_proto is None or transport is None:
        return None
    return m.value_for_protocol(ip_proto), transport, int(m.value_for_protocol(transport))


def check_host_maddrs(addrs: Sequence[str]) -> None:
    """Fail early when an explicit host port is taken or the IP is not on this machine."""
    for addr in addrs:
        parsed = _ip_port(addr)
        if parsed is None or parsed[2] == 0:
            continue
        ip, transport, port = parsed
        family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
        kind = socket.SOCK_STREAM if transport == "tcp" else socket.SOCK_DGRAM
        with socket.socket(family, kind) as s:
            if transport == "tcp":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
            try:
                s.bind((ip, port))
            except OSError as e:
                raise _bind_error(addr, e) from None


def _bind_error(addr: str, e: OSError) -> NetworkError:
    if e.errno == errno.EADDRINUSE:
        return NetworkError(
            f"--host-maddrs: {addr} is already in use: stop the other program, pick another "
            "port, or use port 0 to let the system choose"
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return NetworkError(
            f"--host-maddrs: {addr} is not an address of this machine: listen on 0.0.0.0 "
            "(or 127.0.0.1) and put the public address in --announce-maddrs"
        )
    return NetworkError(
        f"--host-maddrs: cannot listen on {addr} ({e.strerror}): pick another address or port"
    )


def _check_announce_maddrs(addrs: Sequence[str]) -> None:
    for addr in addrs:
        parsed = _ip_port(addr)
        if parsed is not None and parsed[2] == 0:
            raise NetworkError(
                f"--announce-maddrs: {addr} has port 0: announce the explicit port peers "
                "should dial (e.g. the one forwarded on your router)"
            )


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The DHT's multiaddrs as strings, each with its /p2p/ peer id, loopback first."""
    peer_id = dht.peer_id.to_base58()
    out = []
    for m in dht.get_visible_maddrs():
        text = str(m)
        if "/p2p/" not in text:
            text = f"{text}/p2p/{peer_id}"
        out.append(text)
    return sorted(out, key=lambda a: not _is_loopback(a))


def _is_loopback(addr: str) -> bool:
    parsed = _ip_port(addr)
    return parsed is not None and ipaddress.ip_address(parsed[0]).is_loopback


# ----------------------------------------------------------------------------- identity


def prepare_identity(path: str) -> tuple[str, str]:
    """Create the identity file if missing (mode 0600), tighten loose permissions; return (path, peer id)."""
    p = Path(path).expanduser().resolve()
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not p.exists():
        _create_identity(p)
        logger.info(f"created a new identity file {p}")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        os.chmod(p, 0o600)
        logger.warning(f"identity file {p} was readable by others (mode {mode:o}); changed it to 600")
    try:
        peer_id = PeerID.from_identity(p.read_bytes()).to_base58()
    except Exception:
        raise NetworkError(
            f"identity file {p} is not a valid libp2p private key: delete it to create a new "
            "one (the peer ID will change) or point dht.identity_path elsewhere"
        ) from None
    return str(p), peer_id


def _create_identity(p: Path) -> None:
    """Write a new key where nobody else can read it, then link it into place (no clobbering)."""
    tmp_dir = tempfile.mkdtemp(prefix=".identity-", dir=p.parent)  # mode 0700
    try:
        tmp = os.path.join(tmp_dir, "key")
        P2P.generate_identity(tmp)
        os.chmod(tmp, 0o600)
        with contextlib.suppress(FileExistsError):  # someone else created it meanwhile: use theirs
            os.link(tmp, p)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- start / stop


def start_dht(
    cfg: DHTConfig, *, record_validators: Sequence = (), client_mode: bool | None = None, reaper: bool = True
) -> hivemind.DHT:
    """Start a DHT node as `cfg` says; raise NetworkError with a one-line fix when it cannot."""
    if threading.current_thread() is not threading.main_thread():
        logger.warning("start_dht called outside the main thread; hivemind forks the DHT process from here")
    kwargs = _dht_kwargs(cfg, record_validators, cfg.client_mode if client_mode is None else client_mode)
    if reaper:
        start_orphan_reaper()
    t0 = deadline = time.monotonic()
    deadline += cfg.bootstrap_timeout
    delay, attempt = 1.0, 1
    while True:
        try:
            dht = _start_once(kwargs, ready_timeout=2 * cfg.startup_timeout + 30)
            break
        except _Unreachable as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetworkError(
                    f"could not reach any of --initial-peers within {cfg.bootstrap_timeout:g}s: check the "
                    "address and that the bootstrap node is running"
                ) from e
            wait = min(delay, left)
            logger.warning(
                f"initial peers not reachable yet, retrying in {wait:.0f}s "
                f"(attempt {attempt}, {left:.0f}s left)"
            )
            time.sleep(wait)
            delay, attempt = min(2 * delay, 8.0), attempt + 1
    if reaper:
        notify_reaper()
    logger.info(f"DHT started in {time.monotonic() - t0:.1f}s as peer {dht.peer_id}")
    if kwargs.get("use_auto_relay"):
        _report_relay(kwargs)
    return dht


def _report_relay(kwargs: dict) -> None:
    """dht.auto_relay: say what libp2p does (p2pd's API does not show the reservations it holds)."""
    relays = kwargs.get("trusted_relays") or []
    logger.info(f"behind NAT (dht.auto_relay): reserving a relay slot with public peers of the run ({len(relays)} "
                "given; libp2p reserves once it knows 4 relay candidates, or after about 3 minutes with fewer); "
                "others reach us through /p2p-circuit addresses")


def _dht_kwargs(cfg: DHTConfig, record_validators: Sequence, client_mode: bool) -> dict:
    initial = validate_maddrs(cfg.initial_peers, "--initial-peers", require_peer_id=True)
    host = validate_maddrs(cfg.host_maddrs, "--host-maddrs")
    announce = validate_maddrs(cfg.announce_maddrs, "--announce-maddrs")
    if not host and not client_mode:
        raise NetworkError("--host-maddrs is empty: listen on e.g. /ip4/127.0.0.1/tcp/0 (or use client mode)")
    _check_announce_maddrs(announce)
    check_host_maddrs(host)
    kwargs = dict(
        initial_peers=list(initial),
        host_maddrs=list(host),
        announce_maddrs=list(announce) or None,
        client_mode=client_mode,
        startup_timeout=cfg.startup_timeout,
        record_validators=list(record_validators),
    )
    if cfg.reachability != "auto":
        kwargs["force_reachability"] = cfg.reachability
    if cfg.auto_relay and not client_mode:
        # we know we are behind NAT (the user says so): no AutoNAT probing, reserve a slot with the relays now
        kwargs.update(use_auto_relay=True, force_reachability="private",
                      trusted_relays=list(validate_maddrs(cfg.relays, "dht.relays", require_peer_id=True)) or list(initial))
    if cfg.identity_path:
        kwargs["identity_path"], peer_id = prepare_identity(cfg.identity_path)
        logger.info(f"using identity {kwargs['identity_path']} (peer ID {peer_id})")
    return kwargs


def _start_once(kwargs: dict, ready_timeout: float) -> hivemind.DHT:
    tag = uuid.uuid4().hex
    dht = hivemind.DHT(start=False, **kwargs)
    try:
        with _env(DHT_TAG_ENV, tag):  # the forked DHT process passes it on to p2pd
            dht.start()
        dht.wait_until_ready(timeout=ready_timeout)
    except BaseException as e:
        _cleanup_failed(dht, tag)
        if isinstance(e, Exception):
            raise _classify(e, ready_timeout) from e
        raise
    _tags[dht] = tag
    return dht


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _classify(e: Exception, ready_timeout: float) -> Exception:
    msg = str(e)
    if "failed to connect to bootstrap peers" in msg or "none of the initial_peers responded" in msg:
        return _Unreachable(msg)
    if "address already in use" in msg:
        return NetworkError(
            "--host-maddrs: an address is already in use: pick another port or use port 0 "
            f"to let the system choose ({msg.splitlines()[-1][-120:]})"
        )
    if "already taken by another peer" in msg:
        return NetworkError(
            "another running peer already uses this identity file: stop it, or give this "
            "peer its own dht.identity_path"
        )
    if "Daemon failed to start in" in msg or isinstance(e, TimeoutError):
        return NetworkError(
            f"the DHT did not start in time ({msg or f'{ready_timeout:g}s'}): the machine may "
            "be overloaded; raise dht.startup_timeout"
        )
    return NetworkError(f"could not start the DHT: {type(e).__name__}: {msg.splitlines()[0] if msg else ''}")


def _cleanup_failed(dht: hivemind.DHT, tag: str) -> None:
    """End a DHT process that failed to start, and any p2pd it left behind."""
    with contextlib.suppress(Exception):
        if dht.pid is not None:
            dht.join(timeout=3)
            if dht.is_alive():
                dht.terminate()
                dht.join(timeout=3)
            if dht.is_alive():
                dht.kill()
                dht.join(timeout=2)
    _reap_tagged(tag)


def _reap_tagged(tag: str) -> None:
    leftovers = tagged_processes(DHT_TAG_ENV, tag, name="p2pd")
    if leftovers:
        logger.debug(f"ending leftover p2pd {[p.pid for p in leftovers]}")
        reap(leftovers)


def tagged_processes(var: str, value: str, name: str | None = None) -> list[psutil.Process]:
    """Running (non-zombie) processes whose exec-time environment has var=value."""
    found = []
    for p in psutil.process_iter(["name", "status"]):
        if (name and p.info["name"] != name) or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if p.environ().get(var) == value:
                found.append(p)
    return found


def shutdown_dht(dht: hivemind.DHT | None) -> None:
    """Stop a DHT and its p2pd; idempotent, never raises."""
    if dht is None:
        return
    try:
        if dht.is_alive():
            dht.shutdown()
            dht.join(timeout=5)
    except Exception as e:  # e.g. called from another process, or a broken pipe
        logger.debug(f"DHT shutdown: {e!r}")
    with contextlib.suppress(Exception):  # never leave a live child: the interpreter would wait for it at exit
        if dht.pid is not None and dht.is_alive():
            dht.kill()
            dht.join(timeout=2)
    tag = _tags.pop(dht, None)
    if tag is not None:
        with contextlib.suppress(Exception):
            _reap_tagged(tag)
