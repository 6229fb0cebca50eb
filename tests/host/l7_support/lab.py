"""A small L7 lab on the host: network namespaces, real nginx, real backends.

    client ns  198.51.100.10 ---- 198.51.100.1  lb ns  (VIPs on lo, nginx,
                                                  openclb-healthd)
                                  10.99.0.1 ---- backend ns 10.99.0.21-24
                                                  (one backend.py per address)

The role runs inside the lb namespace with a local connection and every path
moved under a temporary directory (l7_service_manager: none), so nothing on
the host outside the namespaces and that directory is touched.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "unit", "l7"))

import model_fixture  # noqa: E402

# the virtualenv's own, as in tests/lab/conftest.py (same override)
PLAYBOOK = os.environ.get("OPENCLB_ANSIBLE_PLAYBOOK", os.path.join(os.path.dirname(sys.executable), "ansible-playbook"))
CLIENT_ADDR = "198.51.100.10"


def sh(*argv, check=True, ns=None, timeout=120, **kw):
    if ns:
        argv = ("ip", "netns", "exec", ns) + argv
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout, **kw)


def make_cert(directory, name, domains):
    key = os.path.join(directory, name + ".key")
    crt = os.path.join(directory, name + ".crt")
    san = ",".join("DNS:" + d for d in domains)
    sh(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key,
        "-out",
        crt,
        "-days",
        "2",
        "-subj",
        "/CN=" + domains[0],
        "-addext",
        "subjectAltName=" + san,
    )
    with open(crt, encoding="utf-8") as c, open(key, encoding="utf-8") as k:
        return {"certificate": c.read(), "key": k.read()}


class L7Lab:
    def __init__(self):
        tag = "%x" % (os.getpid() & 0xFFFF)
        self.lb, self.be, self.cl = "oclb7-lb-" + tag, "oclb7-be-" + tag, "oclb7-cl-" + tag
        self.tmp = tempfile.mkdtemp(prefix="openclb-l7-")
        self.procs = {}
        self.model = model_fixture.normalised()
        self.tls = {}

    # ------------------------------------------------------------ network
    def setup(self):
        for ns in (self.lb, self.be, self.cl):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            # A stream that opens a connection per request can run 1,600/s here:
            # in 45 s its TIME_WAIT sockets would fill the default 28k ephemeral
            # ports (with them, connect() slowed it to 600/s and then failed with
            # EADDRNOTAVAIL), a client-side limit that says nothing about nginx. Give the test clients (and nginx's
            # upstream side) the whole range and let them reuse TIME_WAIT ports.
            sh("sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1", ns=ns)
        sh("ip", "link", "add", "l7b0", "netns", self.lb, "type", "veth", "peer", "name", "l7b1", "netns", self.be)
        sh("ip", "link", "add", "l7c0", "netns", self.lb, "type", "veth", "peer", "name", "l7c1", "netns", self.cl)
        sh("ip", "addr", "add", "10.99.0.1/24", "dev", "l7b0", ns=self.lb)
        sh("ip", "addr", "add", "198.51.100.1/24", "dev", "l7c0", ns=self.lb)
        for addr in model_fixture.BACKENDS.values():
            sh("ip", "addr", "add", addr + "/24", "dev", "l7b1", ns=self.be)
        sh("ip", "addr", "add", CLIENT_ADDR + "/24", "dev", "l7c1", ns=self.cl)
        for ns, dev in ((self.lb, "l7b0"), (self.lb, "l7c0"), (self.be, "l7b1"), (self.cl, "l7c1")):
            sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.1", ns=self.cl)
        os.makedirs(os.path.join(self.tmp, "backends"))
        os.makedirs(os.path.join(self.tmp, "log"))
        for name, addr in model_fixture.BACKENDS.items():
            self.start_backend(name, addr)
        certs = os.path.join(self.tmp, "certs")
        os.makedirs(certs)
        self.tls = {
            "www": make_cert(certs, "www", ["www.example.com"]),
            "api": make_cert(certs, "api", ["api.example.net"]),
        }
        self.certs = certs
        self.wait_backends()

    def start_backend(self, name, addr):
        log = open(os.path.join(self.tmp, "backends", name + ".log"), "w")
        self.procs["be-" + name] = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.be,
                sys.executable,
                os.path.join(HERE, "backend.py"),
                name,
                addr,
                "8080",
                os.path.join(self.tmp, "backends"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_backends(self):
        for addr in model_fixture.BACKENDS.values():
            for _attempt in range(50):
                if (
                    sh(
                        "curl", "-s", "-o", "/dev/null", f"http://{addr}:8080/health", ns=self.lb, check=False
                    ).returncode
                    == 0
                ):
                    break
                time.sleep(0.1)

    def set_health(self, backend, status):
        path = os.path.join(self.tmp, "backends", backend + ".health")
        if status is None:
            if os.path.exists(path):
                os.unlink(path)
        else:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(str(status))

    # --------------------------------------------------------------- role
    def write_tls_material(self, tls):
        """The role reads <name>.crt / <name>.key from a controller directory."""
        directory = os.path.join(self.tmp, "tls-material")
        os.makedirs(directory, exist_ok=True)
        for name, pair in tls.items():
            for ext, field in (("crt", "certificate"), ("key", "key")):
                if field in pair:
                    with open(os.path.join(directory, f"{name}.{ext}"), "w", encoding="utf-8") as fh:
                        fh.write(pair[field])
        return directory

    def role_vars(self, model=None, tls=None):
        t = self.tmp
        return {
            "openclb_model": model or self.model,
            "openclb_tls_material_dir": self.write_tls_material(tls or self.tls),
            "l7_service_manager": "none",
            "l7_manage_packages": False,
            "l7_etc_dir": t + "/etc",
            "l7_lib_dir": t + "/lib",
            "l7_state_dir": t + "/state",
            "l7_log_dir": t + "/log",
            "l7_sysctl_file": t + "/sysctl.conf",
            "l7_nginx_main_conf": t + "/nginx.conf",
            "l7_nginx_pid": t + "/nginx.pid",
            "l7_nginx_worker_processes": 2,
            "l7_nginx_worker_connections": 1024,
            "l7_healthd_debounce": 0.3,
        }

    def converge(self, model=None, tls=None, check=False, extra=()):
        vars_file = os.path.join(self.tmp, "vars.json")
        with open(vars_file, "w", encoding="utf-8") as fh:
            json.dump(self.role_vars(model, tls), fh)
        inv = os.path.join(self.tmp, "inventory.yml")
        with open(inv, "w", encoding="utf-8") as fh:
            fh.write(
                "l7_nodes:\n  hosts:\n    l7a:\n      ansible_connection: local\n"
                "      ansible_python_interpreter: /usr/bin/python3\n"
            )
        argv = [
            PLAYBOOK,
            "-i",
            inv,
            os.path.join(REPO, "playbooks", "l7.yml"),
            "-e",
            "@" + vars_file,
        ]
        if check:
            argv += ["--check", "--diff"]
        argv += list(extra)
        env = dict(
            os.environ,
            ANSIBLE_CONFIG=os.path.join(REPO, "ansible.cfg"),
            ANSIBLE_CALLBACK_RESULT_FORMAT="json",
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_LOCAL_TEMP=os.path.join(self.tmp, "ansible-tmp"),
            ANSIBLE_REMOTE_TEMP=os.path.join(self.tmp, "ansible-tmp"),
        )
        result = sh(*argv, ns=self.lb, check=False, timeout=600, env=env, cwd=REPO)
        healthd = self.procs.get("healthd")
        if not check and healthd and healthd.poll() is None:
            # l7_service_manager none: the role's "reload healthd" is ours to do
            os.kill(healthd.pid, signal.SIGHUP)
        return result

    @staticmethod
    def recap(result):
        """(changed, failed) from the PLAY RECAP of an ansible-playbook run."""
        for line in result.stdout.splitlines():
            if line.startswith("l7a ") and "changed=" in line:
                fields = dict(f.split("=") for f in line.split()[2:])
                return int(fields["changed"]), int(fields["failed"])
        raise AssertionError("no recap:\n" + result.stdout[-3000:] + result.stderr[-2000:])

    # ------------------------------------------------------------ daemons
    def start_nginx(self):
        self.procs["nginx"] = subprocess.Popen(
            ["ip", "netns", "exec", self.lb, "nginx", "-c", self.tmp + "/nginx.conf", "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp + "/log/nginx.out", "w"),
            start_new_session=True,
        )
        for _attempt in range(50):
            if os.path.exists(self.tmp + "/nginx.pid") and os.path.getsize(self.tmp + "/nginx.pid"):
                time.sleep(0.2)  # workers
                return
            time.sleep(0.1)
        raise AssertionError("nginx did not start: " + open(self.tmp + "/log/nginx.out").read())

    def start_healthd(self):
        self.procs["healthd"] = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.lb,
                sys.executable,
                self.tmp + "/lib/openclb-healthd",
                "run",
                "--config",
                self.tmp + "/etc/nginx/current/healthd.json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp + "/log/healthd.log", "w"),
            start_new_session=True,
        )
        for _attempt in range(50):
            if self.healthd_status() is not None:
                return
            time.sleep(0.1)
        raise AssertionError("healthd did not start: " + open(self.tmp + "/log/healthd.log").read())

    def healthd_status(self):
        r = sh("curl", "-s", "http://127.0.0.1:9146/status", ns=self.lb, check=False)
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout else None

    def nginx_master_pid(self):
        with open(self.tmp + "/nginx.pid", encoding="utf-8") as fh:
            return int(fh.read())

    # ------------------------------------------------------------- client
    def curl(self, url, *args, timeout=10):
        return sh("curl", "-sS", "--max-time", str(timeout), *args, url, ns=self.cl, check=False)

    def get_json(self, url, *args):
        r = self.curl(url, *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def client(self, *argv, **kw):
        return sh(*argv, ns=self.cl, check=False, **kw)

    # ------------------------------------------------------------ cleanup
    def teardown(self):
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        # nginx may have re-parented workers; anything left in our namespaces goes
        for ns in (self.lb, self.be, self.cl):
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            sh("ip", "netns", "del", ns, check=False)
        if not os.environ.get("OPENCLB_KEEP"):
            shutil.rmtree(self.tmp, ignore_errors=True)
