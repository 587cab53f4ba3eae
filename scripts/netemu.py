"""A small emulated internet on this machine, for tests and benchmarks (needs root, `ip`, `tc`, `nft`).

    with Internet() as net:
        boot = net.public("boot")                              # on the public segment
        home = net.behind_nat("home", up_mbit=20, down_mbit=100)  # its own router with NAT (masquerade)
        proc = home.popen([PYTHON, "-m", "p2p_photon.cli", "peer", ...])

Layout: one namespace holds the public segment (a bridge, 10.200.0.0/24: no address of it exists
outside the namespaces made here). A public host is a namespace with one veth on that bridge; a host
behind NAT is a namespace on its own LAN (192.168.<n>.0/24) behind a router namespace whose WAN side is
on the bridge and masquerades the LAN: the host connects out, nobody outside can connect in (the router
forwards only replies). A host's uplink is shaped with `tbf` on its egress and its downlink on the egress
of the other end; `netem` is not in this kernel, so links add no delay. Every namespace is deleted on
exit, also on failure (deleting a namespace deletes its veths). Names carry the creating pid and a random tag:
concurrent runs never collide, and `cleanup_stale()` removes only what a killed run left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

PREFIX = "ppnet"
PUBLIC_NET = "10.200.0"


class NetemuUnavailable(RuntimeError):
    """This machine cannot build the emulated network (not root, no `ip`/`tc`/`nft`, no namespaces)."""


def _run(*cmd: str, ns: str | None = None, check: bool = True, input: str | None = None) -> str:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    r = subprocess.run(full, capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def why_unavailable() -> str | None:
    """None if namespaces, veths, tbf and nftables work here; else the reason (for a test's skip)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 nftables)"
    try:
        with Internet() as net:
            a = net.public("probe-a", up_mbit=100)
            b = net.behind_nat("probe-b", up_mbit=100)
            if not connects(b, a) or connects(a, b):
                return "the emulated NAT does not behave (a host behind it must connect out and not be reachable)"
    except Exception as e:  # noqa: BLE001 - any failure means: not here
        return f"cannot build an emulated network here: {str(e).splitlines()[0][:200]}"
    return None


_PROBE = """
import socket, sys
srv = socket.create_server(("0.0.0.0", 0))
print(srv.getsockname()[1], flush=True)
srv.settimeout(5)
try:
    srv.accept()
except OSError:
    pass
"""


def connects(src: Host, dst: Host, timeout: float = 2.0) -> bool:
    """Can `src` open a TCP connection to `dst`'s own address?"""
    server = dst.popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, text=True)
    try:
        port = server.stdout.readline().strip()
        r = src.run([sys.executable, "-c", f"import socket; socket.create_connection(('{dst.addr}', {port}), "
                     f"timeout={timeout})"], capture_output=True)
        return r.returncode == 0
    finally:
        server.kill()
        server.wait()


def cleanup_stale() -> None:
    """Delete namespaces left by runs that were killed before their clean-up (their names carry the
    creating process' pid: those of live processes, e.g. a concurrent run, are left alone)."""
    for line in _run("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if name.startswith(PREFIX + "-") and len(parts) > 2 and parts[1].isdigit() and not _alive(int(parts[1])):
            for pid in _run("ip", "netns", "pids", name, check=False).split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            _run("ip", "netns", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Host:
    name: str
    ns: str
    addr: str  # its own address (behind NAT: a LAN address nobody outside can reach)
    public_addr: str  # the address others see its connections come from
    natted: bool
    up_mbit: float | None
    down_mbit: float | None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], **kwargs)

    def wire_bytes(self) -> tuple[int, int]:
        """(bytes sent, received) on the host's one interface since it was made."""
        out = _run("cat", "/proc/net/dev", ns=self.ns)
        for line in out.splitlines():
            if line.strip().startswith("eth0:"):
                f = line.split(":", 1)[1].split()
                return int(f[8]), int(f[0])
        return 0, 0


def _shape(ns: str, dev: str, mbit: float | None) -> None:
    """tbf on `dev`'s egress: `mbit` Mbit/s, a burst of 10 ms of traffic (at least 32 kB), a 200 ms queue."""
    if not mbit:
        return
    burst = max(32_000, int(mbit * 1e6 / 8 / 100))
    _run("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
         "latency", "200ms", ns=ns)


class Internet:
    """The public segment and its hosts; a context manager that deletes everything on exit."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex[:4]}"  # the pid: see cleanup_stale
        self._link_tag = uuid.uuid4().hex[:5]  # interface names have at most 15 characters
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._links = 0
        self._next_public = 10
        self._next_lan = 1
        try:
            self.core = self._netns("core")
            _run("ip", "link", "add", "br0", "type", "bridge", ns=self.core)
            _run("ip", "link", "set", "br0", "up", ns=self.core)
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- building

    def _netns(self, role: str) -> str:
        name = f"{PREFIX}-{self.tag}-{role}"
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "link", "set", "lo", "up", ns=name)
        return name

    def _veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str) -> None:
        """A veth pair with one end `dev_a` in `ns_a` and the other `dev_b` in `ns_b` (both up)."""
        self._links += 1
        a, b = f"pp{self._link_tag}{self._links}a", f"pp{self._link_tag}{self._links}b"
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _run("ip", "link", "set", a, "netns", ns_a, "name", dev_a)
        _run("ip", "link", "set", b, "netns", ns_b, "name", dev_b)
        _run("ip", "link", "set", dev_a, "up", ns=ns_a)
        _run("ip", "link", "set", dev_b, "up", ns=ns_b)

    def _on_bridge(self, ns: str, dev: str) -> tuple[str, str]:
        """Attach `ns` to the public segment as `dev`; (its address, the bridge-side device)."""
        port = f"p{self._next_public}"
        addr = f"{PUBLIC_NET}.{self._next_public}"
        self._next_public += 1
        self._veth(ns, dev, self.core, port)
        _run("ip", "link", "set", port, "master", "br0", ns=self.core)
        _run("ip", "addr", "add", f"{addr}/24", "dev", dev, ns=ns)
        return addr, port

    def public(self, name: str, up_mbit: float | None = None, down_mbit: float | None = None) -> Host:
        """A host with a public address: anyone on the segment can connect to it."""
        ns = self._netns(name)
        addr, port = self._on_bridge(ns, "eth0")
        _shape(ns, "eth0", up_mbit)
        _shape(self.core, port, down_mbit or up_mbit)
        host = Host(name, ns, addr, addr, False, up_mbit, down_mbit or up_mbit)
        self.hosts[name] = host
        return host

    def behind_nat(self, name: str, up_mbit: float | None = None, down_mbit: float | None = None) -> Host:
        """A host on its own LAN behind a masquerading router: it connects out; nobody connects in."""
        lan = f"192.168.{self._next_lan}"
        self._next_lan += 1
        router, ns = self._netns(f"{name}-gw"), self._netns(name)
        wan_addr, port = self._on_bridge(router, "wan")
        self._veth(ns, "eth0", router, "lan")
        _run("ip", "addr", "add", f"{lan}.2/24", "dev", "eth0", ns=ns)
        _run("ip", "addr", "add", f"{lan}.1/24", "dev", "lan", ns=router)
        _run("ip", "route", "add", "default", "via", f"{lan}.1", ns=ns)
        _run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
        _run("nft", "-f", "-", ns=router, input="""
table ip nat {
  chain postrouting { type nat hook postrouting priority 100; oifname "wan" masquerade; }
}
table ip filter {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
  }
}
""")
        _shape(ns, "eth0", up_mbit)  # the home uplink
        _shape(self.core, port, down_mbit or up_mbit)  # its downlink, where the internet delivers to it
        host = Host(name, ns, f"{lan}.2", wan_addr, True, up_mbit, down_mbit or up_mbit)
        self.hosts[name] = host
        return host

    # -------------------------------------------------------------- tearing down

    def close(self) -> None:
        for host in self.hosts.values():
            for p in host.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
        for ns in reversed(self.namespaces):
            # processes still inside (a p2pd its parent failed to stop) would keep the namespace alive
            for pid in _run("ip", "netns", "pids", ns, check=False).split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            _run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    def __enter__(self) -> Internet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if self.namespaces:
            self.close()
