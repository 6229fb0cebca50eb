"""The running lab: a network namespace with one bridge per L2 segment, UML
guests attached by taps, and client namespaces attached by veth pairs.

Everything lives inside namespaces the lab creates: the root namespace never
gets a lab address or route. Guests are started with `setsid` (their own
process group) and stopped with `uml_mconsole halt`, then the process group:
never SIGSTOP/SIGCONT a UML process group (the guest panics) and never
`kill -9` only the main pid (helpers stay behind).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import image
from .topology import Host, Topology
from .util import cache_dir, in_netns, log, run, state_dir

UML = "/usr/bin/linux.uml"
GUEST_MEM = os.environ.get("OPENCLB_GUEST_MEM", "384M")
PTRACE_FIX_SRC = Path(__file__).parent / "native" / "uml_ptrace_fix.c"
SSH_WAIT = 120  # seconds a guest may take to answer ssh after boot


class LabError(Exception):
    pass


def _tap(host: str, index: int) -> str:
    return f"{host[:11]}.{index}"  # interface names are at most 15 characters


class Lab:
    def __init__(self, topo: Topology):
        self.topo = topo
        self.ns = topo.name
        self.state = state_dir(topo.name)

    # ---- names and paths -------------------------------------------------
    def client_ns(self, host: Host) -> str:
        return f"{self.ns}-{host.name}"

    def guest_dir(self, host: Host) -> Path:
        """The lab's own files for a guest (console log, memory file, markers)."""
        return self.state / "guests" / host.name

    def uml_dir(self, host: Host) -> Path:
        """UML's umid directory (pid, mconsole socket); UML removes it when stale."""
        return self.state / "uml" / host.name

    def pid(self, host: Host) -> int | None:
        try:
            pid = int((self.uml_dir(host) / "pid").read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def host(self, name: str) -> Host:
        try:
            return self.topo.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} in the lab inventory (hosts: {', '.join(self.topo.hosts)})") from None

    def netns_exists(self, ns: str | None = None) -> bool:
        return Path("/run/netns", ns or self.ns).exists()

    # ---- ssh ---------------------------------------------------------------
    def ssh_args(self, host: Host, batch: bool = True) -> list[str]:
        key = image.lab_key_path()
        args = [
            "ssh", "-i", str(key), "-l", "root",
            "-o", f"ProxyCommand=ip netns exec {self.ns} socat STDIO TCP:%h:%p",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ControlMaster=auto", "-o", f"ControlPath={self.state}/ssh-%h", "-o", "ControlPersist=120s",
            "-o", "ConnectTimeout=5",
        ]
        if batch:
            args += ["-o", "BatchMode=yes"]
        return args + [host.mgmt_address]

    def exec_argv(self, name: str, cmd: list[str], tty: bool = False) -> list[str]:
        """The argv that runs `cmd` on a guest (over ssh) or in a client namespace."""
        host = self.host(name)
        if host.client:
            return in_netns(self.client_ns(host), cmd or [os.environ.get("SHELL", "/bin/bash")])
        self.ensure_master(host)
        remote = " ".join(shlex.quote(c) for c in cmd)
        return self.ssh_args(host, batch=not tty) + (["-t"] if tty else []) + ([remote] if remote else [])

    def ensure_master(self, host: Host) -> None:
        """Start the guest's ssh ControlMaster, if none runs, with /dev/null as its stdin.

        The ssh that becomes the master sets O_NONBLOCK on the stdin it was
        handed and keeps it (it outlives the call): on an inherited stdin that
        flag lands on the caller's file, and every later ansible command there
        fails with "Ansible requires blocking IO on stdin". Callers' own ssh
        then only ever runs as a client of this master."""
        args = self.ssh_args(host)
        if subprocess.run(args[:-1] + ["-O", "check", args[-1]], stdin=subprocess.DEVNULL,
                          capture_output=True, check=False).returncode == 0:
            return
        try:
            self.ssh_ready(host)
        except subprocess.TimeoutExpired:
            pass  # the guest is not answering (yet): the caller's own ssh reports it

    def ssh_ready(self, host: Host) -> bool:
        """ssh to the guest works. With no master running, this ssh becomes it:
        hence /dev/null as stdin (ensure_master)."""
        res = subprocess.run(self.ssh_args(host) + ["true"], stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=30, check=False)
        return res.returncode == 0

    # ---- network -----------------------------------------------------------
    def create_network(self) -> None:
        if not self.netns_exists():
            run(["ip", "netns", "add", self.ns])

        def nsrun(*args: str) -> None:
            run(["ip", "-n", self.ns, *args])

        nsrun("link", "set", "lo", "up")
        for net in self.topo.networks.values():
            if run(["ip", "-n", self.ns, "link", "show", net.bridge], check=False, quiet=True).returncode:
                # multicast snooping off: VRRP, IPVS sync and conntrackd multicast must flood
                nsrun("link", "add", net.bridge, "type", "bridge", "mcast_snooping", "0", "stp_state", "0",
                      "forward_delay", "0")
            nsrun("link", "set", net.bridge, "up")
            if net.lab_address:
                nsrun("addr", "replace", net.lab_address, "dev", net.bridge)
        for host in self.topo.clients:
            self._create_client(host)

    def _create_client(self, host: Host) -> None:
        ns = self.client_ns(host)
        if self.netns_exists(ns):
            return
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for i, nic in enumerate(host.nics):
            outer = _tap(host.name, i)
            bridge = self.topo.networks[nic.network].bridge
            run(["ip", "-n", self.ns, "link", "add", outer, "type", "veth", "peer", "name", nic.network, "netns", ns])
            run(["ip", "-n", self.ns, "link", "set", outer, "master", bridge, "up"])
            run(["ip", "-n", ns, "link", "set", nic.network, "up"])
            for addr in nic.addresses:
                run(["ip", "-n", ns, "addr", "add", addr, "dev", nic.network])

    def create_taps(self, host: Host) -> list[str]:
        taps = []
        for i, nic in enumerate(host.nics):
            tap = _tap(host.name, i)
            if run(["ip", "-n", self.ns, "link", "show", tap], check=False, quiet=True).returncode:
                run(["ip", "-n", self.ns, "tuntap", "add", tap, "mode", "tap"])
            run(["ip", "-n", self.ns, "link", "set", tap, "master", self.topo.networks[nic.network].bridge, "up"])
            taps.append(tap)
        return taps

    # ---- guests ------------------------------------------------------------
    def ptrace_fix(self) -> str | None:
        """Build the ptrace shim when this CPU needs it (see lab-facts.md, pitfall 1)."""
        if os.environ.get("OPENCLB_UML_PTRACE_FIX", "auto") == "off":
            return None
        flags = Path("/proc/cpuinfo").read_text()
        if "avx512f" not in flags and "amx_tile" not in flags and os.environ.get("OPENCLB_UML_PTRACE_FIX") != "on":
            return None
        so = cache_dir() / "uml_ptrace_fix.so"
        if not so.exists() or so.stat().st_mtime < PTRACE_FIX_SRC.stat().st_mtime:
            log("this CPU has a large XSAVE area (AVX-512/AMX): building the UML ptrace fix (LD_PRELOAD)")
            so.parent.mkdir(parents=True, exist_ok=True)
            run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(so), str(PTRACE_FIX_SRC), "-ldl"])
        return str(so)

    def boot(self, host: Host, base: Path, preload: str | None) -> None:
        if self.pid(host):
            return
        gdir = self.guest_dir(host)
        gdir.mkdir(parents=True, exist_ok=True)
        taps = self.create_taps(host)
        net = ",".join(
            f"vec{i}:{nic.network}:{'+'.join(nic.addresses)}" for i, nic in enumerate(host.nics))
        argv = [
            UML, f"umid={host.name}", f"uml_dir={self.state / 'uml'}", f"mem={GUEST_MEM}",
            f"ubd0={self.state / (host.name + '.cow')},{base}", "root=/dev/ubda", "rw",
            "con=null", "con0=null,fd:1", "ssl=null", "loglevel=4",
            f"openclb.hostname={host.name}", f"openclb.net={net}",
        ]
        if host.gateway:
            argv.append(f"openclb.gw={host.gateway}")
        argv += [f"vec{i}:transport=tap,ifname={tap},depth=128,gro=1" for i, tap in enumerate(taps)]
        # UML backs guest RAM with an (unlinked) temp file: on tmpfs, not disk,
        # so guest memory never goes through disk writeback.
        env = dict(os.environ, TMPDIR="/dev/shm" if Path("/dev/shm").is_dir() else str(gdir))
        if preload:
            env["LD_PRELOAD"] = preload
        console = open(gdir / "console.log", "ab")
        subprocess.Popen(in_netns(self.ns, argv), stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                         env=env, start_new_session=True, cwd=gdir)
        console.close()

    def wait_ssh(self, host: Host, deadline: float) -> None:
        started = time.monotonic()
        while time.monotonic() < deadline:
            if not self.pid(host) and time.monotonic() - started > 10:
                break  # the guest process is gone: it panicked or failed to start
            try:
                if self.ssh_ready(host):
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        tail = (self.guest_dir(host) / "console.log").read_text(errors="replace")[-1500:]
        raise LabError(f"{host.name} did not answer ssh within {SSH_WAIT} s. Console tail:\n{tail}\n"
                       f"Next: `openclb-lab status`, the full console in {self.guest_dir(host)}/console.log")

    def up(self, names: list[str] | None = None) -> None:
        t0 = time.monotonic()
        base = image.ensure_image()
        preload = self.ptrace_fix()
        self.state.mkdir(parents=True, exist_ok=True)
        self.create_network()
        guests = [h for h in self.topo.guests if not names or h.name in names]
        log(f"booting {len(guests)} guests in parallel: {', '.join(h.name for h in guests)}")
        for h in guests:
            self.boot(h, base, preload)
        deadline = time.monotonic() + SSH_WAIT
        with ThreadPoolExecutor(max_workers=len(guests) or 1) as pool:
            futures = {pool.submit(self.wait_ssh, h, deadline): h for h in guests}
            errors = []
            for fut, h in futures.items():
                try:
                    fut.result()
                    log(f"{h.name}: ssh ready")
                except LabError as e:
                    errors.append(str(e))
        if errors:
            raise LabError("\n".join(errors))
        log(f"lab {self.ns} up: {len(guests)} guests, {len(self.topo.clients)} clients in {time.monotonic() - t0:.1f} s")

    def mconsole(self, host: Host, *cmd: str, check: bool = True, timeout: float = 10) -> str:
        sock = self.uml_dir(host) / "mconsole"
        if not sock.exists():
            raise LabError(f"{host.name} is not running (no mconsole socket)")
        try:
            res = run(["uml_mconsole", str(sock), *cmd], check=check, timeout=timeout)
        except subprocess.TimeoutExpired:
            # `halt` may never answer: the guest is gone before it replies
            return ""
        return res.stdout.strip()

    def halt(self, host: Host) -> None:
        """Stop a guest at once, like pulling the power (no clean shutdown).

        The whole process group goes (the guest was started with setsid): a
        kill of the main pid alone would leave UML's helper processes behind."""
        pid = self.pid(host)
        (self.guest_dir(host) / "frozen").unlink(missing_ok=True)
        if not pid:
            return
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except OSError:
            pass
        end = time.monotonic() + 10
        while time.monotonic() < end and self.pid(host):
            time.sleep(0.1)

    def freeze(self, host: Host) -> None:
        """A hard failure: the guest kernel stops (it answers nothing) until thawed."""
        self.mconsole(host, "stop")
        (self.guest_dir(host) / "frozen").touch()

    def thaw(self, host: Host) -> None:
        self.mconsole(host, "go")
        (self.guest_dir(host) / "frozen").unlink(missing_ok=True)

    def down(self) -> None:
        for host in self.topo.guests:
            if self.pid(host):
                log(f"{host.name}: halt")
            self.halt(host)
        # anything this lab started and still running (by its state path)
        run(["pkill", "-KILL", "-f", str(self.state)], check=False, quiet=True)
        for host in self.topo.clients:
            if self.netns_exists(self.client_ns(host)):
                run(["ip", "netns", "del", self.client_ns(host)])
        if self.netns_exists():
            run(["ip", "netns", "del", self.ns])  # takes its bridges, taps and veths with it
        shutil.rmtree(self.state, ignore_errors=True)
        log(f"lab {self.ns} down: no guest, namespace, tap or bridge left")

    def status(self) -> list[dict]:
        rows = []
        for host in self.topo.hosts.values():
            if host.client:
                state = "up" if self.netns_exists(self.client_ns(host)) else "down"
                rows.append({"host": host.name, "kind": "client", "state": state, "pid": None,
                             "address": ",".join(a for n in host.nics for a in n.addresses)})
                continue
            pid = self.pid(host)
            state = "down"
            if pid:
                state = "frozen" if (self.guest_dir(host) / "frozen").exists() else "running"
            rows.append({"host": host.name, "kind": ",".join(host.groups) or "guest", "state": state, "pid": pid,
                         "address": host.mgmt_address})
        return rows
