"""The openclb key-server chain, built for real inside network namespaces.

Namespaces (all private to one Chain, named after its prefix):
  <p>-ks1, <p>-ks2  SoftHSM2 token + p11-kit server + stunnel server (roles/keyserver files)
  <p>-l7            stunnel client + nginx + watchdog (roles/keyclient files)
  <p>-cl            the TLS client (handshake load)
Point-to-point veth links from l7 to each of the others; nothing touches the
root namespace's addresses or routes. Configuration files are rendered from
the roles' own templates, and the roles' own scripts do the work, so these
tests exercise what the playbooks install.
"""
import json
import os
import shutil
import signal
import subprocess
import time

import jinja2

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYSTORE = os.path.join(REPO, "roles/keyserver/files/openclb-keystore")
WATCHDOG = os.path.join(REPO, "roles/keyclient/files/openclb-keyclient-watchdog")
LOADGEN = os.path.join(REPO, "tests/host/ksload.py")

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
REQUIRED = {
    "softhsm2-util": "softhsm2", "p11-kit": "p11-kit", "stunnel4": "stunnel4",
    "pkcs11-tool": "opensc", "nginx": "nginx", "openssl": "openssl", "ip": "iproute2",
    "iptables": "iptables", "setpriv": "util-linux",
}
REQUIRED_FILES = {SOFTHSM: "softhsm2", P11KIT_CLIENT: "p11-kit-modules", ENGINE: "libengine-pkcs11-openssl"}

CLUSTER = "t"
TOKEN = "openclb-" + CLUSTER
PIN = "1234"  # test-only token PINs, generated material lives in a temp dir
SO_PIN = "87654321"
PORT = 2407
# Listeners on the l7 node: name -> (port, certificate name, key store)
LISTENERS = {
    "rsa-ks": (8443, "www-rsa", "keyserver"),
    "ec-ks": (8444, "www-ec", "keyserver"),
    "rsa-local": (8445, "www-rsa", "local"),
    "ec-local": (8446, "www-ec", "local"),
}
LINKS = {"ks1": 1, "ks2": 2, "cl": 3}  # 10.250.N.1 on l7, 10.250.N.2 on the peer


def missing_prerequisites():
    """Reasons the chain cannot be built here (empty list: it can)."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("needs root (network namespaces)")
    for tool, pkg in REQUIRED.items():
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            reasons.append(f"{tool} missing (apt-get install {pkg})")
    for path, pkg in REQUIRED_FILES.items():
        if not os.path.exists(path):
            reasons.append(f"{path} missing (apt-get install {pkg})")
    return reasons


def sh(*argv, check=True, **kw):
    proc = subprocess.run([str(a) for a in argv], check=False, capture_output=True, text=True, **kw)
    if check and proc.returncode:
        cmd = " ".join(str(a) for a in argv)
        raise RuntimeError(f"{cmd}: rc={proc.returncode} {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def render(role, template, **variables):
    """Render a role template the way the role does (ansible_managed, comment, to_nice_json)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(REPO, "roles", role, "templates")),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True)

    def comment(text, decoration="# "):
        return "\n".join(decoration + line for line in text.splitlines())

    env.filters["comment"] = comment
    env.filters["to_nice_json"] = lambda v: json.dumps(v, indent=2, sort_keys=True)
    env.filters["basename"] = os.path.basename
    env.filters["dirname"] = os.path.dirname
    return env.get_template(template).render(ansible_managed="Managed by openclb tests", **variables)


class Pki:
    """Cluster CA, node certificates, a foreign CA and the HTTPS certificates."""

    def __init__(self, d):
        self.d = d
        os.makedirs(d, exist_ok=True)

    def path(self, name):
        return os.path.join(self.d, name)

    def ca(self, name):
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", self.path(name + ".key"), "-out", self.path(name + ".crt"), "-days", "2",
           "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
           "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        with open(self.path(name + ".index"), "w"):
            pass
        with open(self.path(name + ".cnf"), "w") as f:
            f.write("[ca]\ndefault_ca=c\n[c]\ndatabase={}\ndefault_md=sha256\ndefault_crl_days=2\n".format(self.path(name + ".index")))

    def node(self, ca, name, usage):
        ext = self.path(name + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    f"extendedKeyUsage={usage}\nsubjectAltName=DNS:{name}\n")
        sh("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
           "-keyout", self.path(name + ".key"), "-out", self.path(name + ".csr"), "-subj", f"/CN={name}")
        sh("openssl", "x509", "-req", "-in", self.path(name + ".csr"), "-CA", self.path(ca + ".crt"),
           "-CAkey", self.path(ca + ".key"), "-CAcreateserial", "-days", "2", "-extfile", ext,
           "-out", self.path(name + ".crt"))

    def crl(self, ca, revoke=()):
        for name in revoke:
            sh("openssl", "ca", "-config", self.path(ca + ".cnf"), "-keyfile", self.path(ca + ".key"),
               "-cert", self.path(ca + ".crt"), "-revoke", self.path(name + ".crt"))
        sh("openssl", "ca", "-gencrl", "-config", self.path(ca + ".cnf"), "-keyfile", self.path(ca + ".key"),
           "-cert", self.path(ca + ".crt"), "-out", self.path(ca + ".crl"))

    def https(self, name, algorithm):
        opts = ["rsa", "-pkeyopt", "rsa_keygen_bits:2048"] if algorithm == "rsa" else \
            ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        sh("openssl", "req", "-x509", "-newkey", *opts, "-nodes", "-keyout", self.path(name + ".key"),
           "-out", self.path(name + ".crt"), "-days", "2", "-subj", f"/CN={name}.example.test")


class Chain:
    def __init__(self, workdir, prefix=None, workers=2):
        self.dir = workdir
        self.prefix = prefix or f"oks{os.getpid() % 100000}"
        self.workers = workers
        self.pki = Pki(os.path.join(workdir, "pki"))
        self.procs = {}
        self.ns_created = []

    # ---------- plumbing
    def ns(self, short):
        return f"{self.prefix}-{short}"

    def nsexec(self, short, *argv, check=True, **kw):
        return sh("ip", "netns", "exec", self.ns(short), *argv, check=check, **kw)

    def addr(self, peer, side):
        return f"10.250.{LINKS[peer]}.{1 if side == 'l7' else 2}"

    def log_path(self, key):
        """Where a spawned process's stdout and stderr go."""
        return os.path.join(self.dir, key + ".log")

    def spawn(self, key, short, argv, env=None, user=None):
        pre = ["setpriv", "--reuid", user, "--regid", user, "--init-groups"] if user else []
        log = open(self.log_path(key), "ab")
        full_env = dict(os.environ, **(env or {}))
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(short)] + pre + [str(a) for a in argv],
                             stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        self.procs[key] = p
        return p

    def stop(self, key, sig=signal.SIGTERM):
        p = self.procs.pop(key, None)
        if p and p.poll() is None:
            os.killpg(p.pid, sig)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def wait_for(self, what, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise RuntimeError("timed out waiting for " + what)

    def port_open(self, short, host, port):
        return self.nsexec(short, "timeout", "1", "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}",
                           check=False).returncode == 0

    # ---------- build
    def setup(self):
        os.makedirs(self.dir, exist_ok=True)
        os.chmod(self.dir, 0o755)
        p = self.pki
        p.ca("cluster-ca")
        p.ca("foreign-ca")
        for ks in ("ks1", "ks2"):
            p.node("cluster-ca", ks, "serverAuth")
        p.node("cluster-ca", "l7-1", "clientAuth")
        p.node("cluster-ca", "l7-revoked", "clientAuth")
        p.node("foreign-ca", "l7-foreign", "clientAuth")
        p.crl("cluster-ca", revoke=["l7-revoked"])
        p.https("www-rsa", "rsa")
        p.https("www-ec", "ec")
        for short in ("l7", "ks1", "ks2", "cl"):
            sh("ip", "netns", "add", self.ns(short))
            self.ns_created.append(self.ns(short))
            self.nsexec(short, "ip", "link", "set", "lo", "up")
        for peer, n in LINKS.items():
            a, b = f"{self.prefix}{n}a", f"{self.prefix}{n}b"
            sh("ip", "link", "add", a, "netns", self.ns("l7"), "type", "veth", "peer", "name", b,
               "netns", self.ns(peer))
            self.nsexec("l7", "ip", "addr", "add", self.addr(peer, "l7") + "/30", "dev", a)
            self.nsexec("l7", "ip", "link", "set", a, "up")
            self.nsexec(peer, "ip", "addr", "add", self.addr(peer, "peer") + "/30", "dev", b)
            self.nsexec(peer, "ip", "link", "set", b, "up")
        for ks in ("ks1", "ks2"):
            self.setup_keyserver(ks)
            self.start_keyserver(ks)
        self.setup_l7()
        self.start_tunnel()
        self.start_nginx()

    def keystore(self, ks, command, payload, check=True):
        env = dict(os.environ, SOFTHSM2_CONF=os.path.join(self.dir, ks, "softhsm2.conf"))
        proc = subprocess.run([KEYSTORE, command, "--token", TOKEN], input=json.dumps(payload),
                              capture_output=True, text=True, env=env, check=False)
        out = json.loads(proc.stdout)
        if check and proc.returncode:
            raise RuntimeError("openclb-keystore {} on {}: {}".format(command, ks, out.get("msg")))
        return out

    def import_key(self, ks, name, pem_path):
        with open(pem_path) as f:
            return self.keystore(ks, "ensure-key", {"pin": PIN, "name": name, "private_key": f.read()})

    def setup_keyserver(self, ks):
        d = os.path.join(self.dir, ks)
        os.makedirs(os.path.join(d, "tokens"))
        tls = os.path.join(d, "tls")
        os.makedirs(tls)
        for src, dst in ((ks + ".crt", "node.crt"), (ks + ".key", "node.key"),
                         ("cluster-ca.crt", "ca.crt"), ("cluster-ca.crl", "crl.pem")):
            shutil.copy(self.pki.path(src), os.path.join(tls, dst))
        v = {"keyserver_token_dir": os.path.join(d, "tokens"), "keyserver_tunnel_log_level": "notice",
                 "keyserver_listen_address": self.addr(ks, "peer"), "keyserver_port": PORT,
                 "keyserver_p11kit_socket": os.path.join(d, "p11-kit.sock"), "keyserver_tls_dir": tls,
                 "keyserver_keepalive_idle": 10, "keyserver_keepalive_interval": 3, "keyserver_keepalive_count": 3,
                 "keyserver_firewall_chain": "OPENCLB-KEYSERVER",
                 "keyserver_allowed_clients": [self.addr(ks, "l7")]}
        for tpl, out in (("softhsm2.conf.j2", "softhsm2.conf"), ("stunnel-keyserver.conf.j2", "stunnel.conf"),
                         ("iptables.rules.j2", "iptables.rules")):
            with open(os.path.join(d, out), "w") as f:
                f.write(render("keyserver", tpl, **v))
        self.keystore(ks, "ensure-token", {"pin": PIN, "so_pin": SO_PIN})
        for name in ("www-rsa", "www-ec"):
            self.import_key(ks, name, self.pki.path(name + ".key"))
        # The same firewall the role loads: only the l7 node reaches 2407.
        self.nsexec(ks, "iptables-restore", "--noflush", os.path.join(d, "iptables.rules"))
        self.nsexec(ks, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", PORT, "-j", "OPENCLB-KEYSERVER")

    def start_keyserver(self, ks):
        d = os.path.join(self.dir, ks)
        sock = os.path.join(d, "p11-kit.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        self.spawn(ks + "-p11kit", ks, ["p11-kit", "server", "--foreground", "--provider", SOFTHSM,
                                        "--name", sock, "pkcs11:token=" + TOKEN],
                   env={"SOFTHSM2_CONF": os.path.join(d, "softhsm2.conf")})
        self.wait_for(ks + " p11-kit socket", lambda: os.path.exists(sock))
        self.spawn(ks + "-stunnel", ks, ["stunnel4", os.path.join(d, "stunnel.conf")])
        self.wait_for(ks + " tunnel port", lambda: self.port_open("l7", self.addr(ks, "peer"), PORT))

    def stop_keyserver(self, ks):
        self.stop(ks + "-stunnel")
        self.stop(ks + "-p11kit")

    def active_keyservers(self):
        """Key servers the l7 node's tunnel currently has connections to."""
        out = self.nsexec("l7", "ss", "-Htn", "state", "established", "dport", f"= :{PORT}").stdout
        return sorted({ks for ks in ("ks1", "ks2") if self.addr(ks, "peer") + ":" in out})

    def blackhole(self, ks, on=True):
        self.nsexec(ks, "iptables", "-I" if on else "-D", "INPUT", "-j", "DROP")

    def setup_l7(self, client_cert="l7-1"):
        d = os.path.join(self.dir, "l7")
        os.makedirs(os.path.join(d, "run"), exist_ok=True)
        tls = os.path.join(d, "tls")
        os.makedirs(tls, exist_ok=True)
        for src, dst in ((client_cert + ".crt", "node.crt"), (client_cert + ".key", "node.key"),
                         ("cluster-ca.crt", "ca.crt"), ("cluster-ca.crl", "crl.pem")):
            shutil.copy(self.pki.path(src), os.path.join(tls, dst))
        sh("chown", "-R", "www-data:www-data", os.path.join(d, "run"), tls)
        self.socket = os.path.join(d, "run", "p11-kit.sock")
        self.render_l7()
        self.env = {"OPENSSL_CONF": os.path.join(d, "openssl.cnf"),
                    "P11_KIT_SERVER_ADDRESS": "unix:path=" + self.socket}
        with open(os.path.join(d, "ticket.key"), "wb") as f:
            f.write(os.urandom(80))
        self.write_nginx_conf()
        wd = {"pid_file": os.path.join(d, "nginx.pid"), "nginx": "/usr/sbin/nginx",
              "error_log": os.path.join(d, "error.log"), "interval": 0.25, "probe_timeout": 1.0,
              "probe_failures": 2, "min_restart_interval": 1.0, "max_backoff": 2.0, "old_worker_grace": 3.0,
              "tunnel_config": os.path.join(d, "stunnel.conf"),
              "probes": [{"host": self.addr("cl", "l7"), "port": LISTENERS[n][0]} for n in ("rsa-ks", "ec-ks")]}
        with open(os.path.join(d, "watchdog.json"), "w") as f:
            json.dump(wd, f)

    def render_l7(self, drain=()):
        """The keyclient role's templates: tunnel (minus drained servers) and engine configuration."""
        d = os.path.join(self.dir, "l7")
        v = {"keyclient_tunnel_log_level": "notice", "keyclient_socket": self.socket,
             "keyclient_servers": [{"name": ks, "address": self.addr(ks, "peer")} for ks in ("ks1", "ks2")],
             "keyclient_drain": list(drain),
             "keyclient_port": PORT, "keyclient_failover": "prio", "keyclient_tls_dir": os.path.join(d, "tls"),
             "keyclient_connect_timeout": 1, "keyclient_keepalive_idle": 10, "keyclient_keepalive_interval": 3,
             "keyclient_keepalive_count": 3, "keyclient_engine_path": ENGINE,
             "keyclient_p11kit_client_module": P11KIT_CLIENT, "keyclient_token_pin": PIN}
        for tpl, out in (("stunnel-keyclient.conf.j2", "stunnel.conf"), ("openssl.cnf.j2", "openssl.cnf")):
            with open(os.path.join(d, out), "w") as f:
                f.write(render("keyclient", tpl, **v))

    def write_nginx_conf(self, certs=None):
        """nginx as roles/l7 renders it for key_store keyserver/local (same key URI and env)."""
        d = os.path.join(self.dir, "l7")
        certs = certs or {n: c for n, (_, c, _) in LISTENERS.items()}
        servers = []
        for name, (port, _, store) in LISTENERS.items():
            cert = certs[name]
            key = (f'"engine:pkcs11:pkcs11:token={TOKEN};object={cert};type=private"'
                   if store == "keyserver" else self.pki.path(cert + ".key"))
            servers.append(f"  server {{ listen {self.addr('cl', 'l7')}:{port} ssl;"
                           f" ssl_certificate {self.pki.path(cert + '.crt')}; ssl_certificate_key {key};"
                           f" return 200 \"{name}\\n\"; }}")
        conf = f"""user www-data;
worker_processes {self.workers};
pid {d}/nginx.pid;
error_log {d}/error.log;
env OPENSSL_CONF;
env P11_KIT_SERVER_ADDRESS;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:1m;
  ssl_session_ticket_key {d}/ticket.key;
{chr(10).join(servers)}
}}
"""
        with open(os.path.join(d, "nginx.conf"), "w") as f:
            f.write(conf)

    def start_tunnel(self):
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.spawn("l7-stunnel", "l7", ["stunnel4", os.path.join(self.dir, "l7", "stunnel.conf")], user="www-data")
        self.wait_for("l7 tunnel socket", lambda: os.path.exists(self.socket))

    def reload_tunnel(self):
        self.procs["l7-stunnel"].send_signal(signal.SIGHUP)
        time.sleep(0.3)

    def upgrade_nginx(self):
        """What the keyclient role's handler runs: one binary upgrade, waits for old workers."""
        return self.nsexec("l7", WATCHDOG, "--config", os.path.join(self.dir, "l7", "watchdog.json"), "--upgrade",
                           timeout=60)

    def nginx(self, *args, check=True):
        d = os.path.join(self.dir, "l7")
        return self.nsexec("l7", "/usr/sbin/nginx", "-e", os.path.join(d, "error.log"), "-c",
                           os.path.join(d, "nginx.conf"), *args, check=check, env=dict(os.environ, **self.env))

    def start_nginx(self):
        self.nginx("-t")
        self.nginx()
        self.wait_for("nginx", lambda: self.nginx_master() is not None)

    def nginx_master(self):
        try:
            with open(os.path.join(self.dir, "l7", "nginx.pid")) as f:
                pid = int(f.read())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def start_watchdog(self):
        self.spawn("watchdog", "l7", [WATCHDOG, "--config", os.path.join(self.dir, "l7", "watchdog.json"),
                                      "--duration", 600])

    # ---------- clients
    def load(self, listener, duration, tls="1.3", resume=False, concurrency=2, timeout=3.0, extra=()):
        """Run tests/host/ksload.py in the client namespace; returns its JSON report."""
        port = LISTENERS[listener][0]
        out = self.nsexec("cl", "python3", LOADGEN, "--host", self.addr("cl", "l7"), "--port", port,
                          "--duration", duration, "--tls", tls, "--concurrency", concurrency,
                          "--timeout", timeout, *(["--resume"] if resume else []), *extra,
                          timeout=duration + 60)
        return json.loads(out.stdout)

    def load_async(self, listener, duration, **kw):
        port = LISTENERS[listener][0]
        argv = ["python3", LOADGEN, "--host", self.addr("cl", "l7"), "--port", str(port), "--duration",
                str(duration), "--tls", kw.get("tls", "1.3"), "--concurrency", str(kw.get("concurrency", 2)),
                "--timeout", str(kw.get("timeout", 3.0))] + (["--resume"] if kw.get("resume") else [])
        return subprocess.Popen(["ip", "netns", "exec", self.ns("cl")] + argv, stdout=subprocess.PIPE, text=True)

    def handshake(self, listener, tls="1.3"):
        return self.load(listener, 0, tls=tls, concurrency=1, extra=("--count", 1))

    # ---------- teardown
    def teardown(self):
        for key in list(self.procs):
            self.stop(key)
        # Everything left in our namespaces (daemonised nginx masters, workers) is ours.
        for ns in self.ns_created:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.2)
        for ns in self.ns_created:
            sh("ip", "netns", "del", ns, check=False)
        self.ns_created = []
