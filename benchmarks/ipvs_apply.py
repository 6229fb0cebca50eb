#!/usr/bin/env python3
"""Benchmark: programming a large IPVS table through the modules' netlink code vs ipvsadm.

Runs INSIDE a guest with IPVS (it flushes that guest's IPVS table), or from the
host with --lab HOST, which copies itself, plugins/module_utils/ipvs.py and
pyroute2 into the lab guest and runs there:

    python benchmarks/ipvs_apply.py --lab lvs1                 # 1,000 services x 10 real servers
    python benchmarks/ipvs_apply.py --lab lvs1 --services 200 --dests 5

Compared, on the same table:
  netlink  : the modules' code path in one process (normalize, dump, diff, apply)
  per-call : one `ipvsadm` process per change (what a shell/`command` loop does)
  restore  : one `ipvsadm -R` fed every change (it cannot diff: a re-apply is flush + reload)
Scenarios: initial load into an empty table, a no-change re-apply, and a change
of 1% of the weights. Prints wall-clock seconds and ratios; single run, noisy
machine: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_in_lab(args):
    import pyroute2  # noqa: F401 - shipped to the guest from this checkout

    lab = os.environ.get("OPENCLB_LAB_CLI") or str(Path(sys.executable).with_name("openclb-lab"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(__file__, arcname="ipvs_apply.py")
        tar.add(HERE.parent / "plugins/module_utils/ipvs.py", arcname="ipvs_mu.py")
        tar.add(Path(pyroute2.__file__).parent, arcname="vendor/pyroute2",
                filter=lambda ti: None if "__pycache__" in ti.name else ti)
    d = "/tmp/openclb-ipvs-bench"
    subprocess.run([lab, "exec", args.lab, "--", "sh", "-c", f"rm -rf {d}; mkdir -p {d}; tar -xf - -C {d}"],
                   input=buf.getvalue(), check=True)
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--lab")
    del argv[i:i + 2]
    return subprocess.call([lab, "exec", args.lab, "--", "env", f"PYTHONPATH={d}:{d}/vendor",
                            "python3", f"{d}/ipvs_apply.py", "--module-utils", d, *argv])


def ip(prefix, i):
    return f"{prefix}.{i // 250}.{i % 250 + 1}"


def build(n_services, n_dests):
    services = []
    for s in range(n_services):
        services.append({
            "address": ip("10.200", s), "port": 80, "scheduler": "wlc",
            "real_servers": [{"address": ip("10.201", s * n_dests + d), "port": 8080, "weight": 1}
                             for d in range(n_dests)],
        })
    return services


def ipvsadm_lines(services, only_weights=None):
    """ipvsadm argument lines; only_weights = [(svc, rs)] gives -e lines for those."""
    if only_weights is not None:
        return [f"-e -t {s['address']}:{s['port']} -r {r['address']}:{r['port']} -m -w {r['weight']}"
                for s, r in only_weights]
    out = []
    for s in services:
        out.append(f"-A -t {s['address']}:{s['port']} -s {s['scheduler']}")
        for r in s["real_servers"]:
            out.append(f"-a -t {s['address']}:{s['port']} -r {r['address']}:{r['port']} -m -w {r['weight']}")
    return out


def sh(cmd, stdin=None):
    subprocess.run(cmd, shell=isinstance(cmd, str), input=stdin, text=True, check=True,
                   stdout=subprocess.DEVNULL)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--dests", type=int, default=10)
    p.add_argument("--lab", help="run inside this lab guest (openclb-lab exec)")
    p.add_argument("--module-utils", help="directory holding ipvs_mu.py (set by --lab)")
    p.add_argument("--per-call-limit", type=int, default=0,
                   help="time only the first N per-call ipvsadm invocations and extrapolate (0 = all)")
    args = p.parse_args()
    if args.lab:
        return run_in_lab(args)
    if args.module_utils:
        sys.path.insert(0, args.module_utils)
        import ipvs_mu as m
    else:
        sys.path.insert(0, str(HERE.parent / "plugins" / "module_utils"))
        import ipvs as m

    services = build(args.services, args.dests)
    n_changes = args.services * (1 + args.dests)
    changed = [(s, r) for s in services for r in s["real_servers"]][::100]  # 1% of the weights
    sh("modprobe ip_vs; ipvsadm -C")

    def netlink(wanted):
        k = m.Kernel()
        try:
            c, actions, _b, _a = m.run_services(k, m.normalize_services(wanted), False, False)
            return len(actions)
        finally:
            k.close()

    def per_call(lines):
        limit = args.per_call_limit or len(lines)
        t = time.perf_counter()
        for line in lines[:limit]:
            subprocess.run(["ipvsadm", *line.split()], check=True)
        return (time.perf_counter() - t) * len(lines) / min(limit, len(lines))

    res = {}
    # 1. initial load
    res["load", "netlink"] = timed(lambda: netlink(services))
    sh("ipvsadm -C")
    res["load", "per-call"] = per_call(ipvsadm_lines(services))
    if args.per_call_limit:
        sh("ipvsadm -C")
    sh("ipvsadm -C")
    restore = "\n".join(ipvsadm_lines(services)) + "\n"
    res["load", "restore"] = timed(lambda: sh(["ipvsadm", "-R"], restore))
    # 2. no-change re-apply (the table is loaded)
    res["noop", "netlink"] = timed(lambda: netlink(services))
    res["noop", "per-call"] = timed(lambda: sh("ipvsadm -Sn"))  # best case: read the table, change nothing
    res["noop", "restore"] = timed(lambda: sh(["ipvsadm", "-R"], "-C\n" + restore))
    # 3. 1% weight change
    for _s, r in changed:
        r["weight"] = 5
    res["weights", "netlink"] = timed(lambda: netlink(services))
    for _s, r in changed:
        r["weight"] = 7
    res["weights", "per-call"] = per_call(ipvsadm_lines(services, only_weights=changed))
    for _s, r in changed:
        r["weight"] = 9
    res["weights", "restore"] = timed(lambda: sh(["ipvsadm", "-R"], "-C\n" + "\n".join(ipvsadm_lines(services))))
    # a check that the last state is what every path wanted
    k = m.Kernel()
    table = m.read_services(k)
    k.close()
    assert len(table) == args.services and sum(len(s["real_servers"]) for s in table) == args.services * args.dests
    assert sum(1 for s in table for r in s["real_servers"] if r["weight"] == 9) == len(changed)
    sh("ipvsadm -C")
    py = timed(lambda: subprocess.run([sys.executable, "-c", "import pyroute2; from pyroute2 import IPVS"],
                                      check=True, env=dict(os.environ)))

    print(f"IPVS apply benchmark: {args.services} services x {args.dests} real servers = {n_changes} entries; "
          f"1% change = {len(changed)} weights; kernel {os.uname().release}")
    if args.per_call_limit:
        print(f"(per-call timings extrapolated from the first {args.per_call_limit} ipvsadm runs per scenario)")
    print(f"{'scenario':<24}{'netlink (s)':>12}{'per-call (s)':>14}{'restore (s)':>13}"
          f"{'per-call/netlink':>18}{'restore/netlink':>17}")
    labels = {"load": "initial load", "noop": "no-change re-apply", "weights": "1% weight change"}
    for key in ("load", "noop", "weights"):
        n, c, r = res[key, "netlink"], res[key, "per-call"], res[key, "restore"]
        print(f"{labels[key]:<24}{n:>12.3f}{c:>14.3f}{r:>13.3f}{c / n:>17.1f}x{r / n:>16.1f}x")
    print("notes: netlink = one process, in-process time; an Ansible module run adds interpreter start-up "
          f"(python + pyroute2 import here: {py:.2f} s) and the Ansible round trip.")
    print("       no-change per-call = `ipvsadm -Sn` only (ipvsadm cannot diff); restore re-apply/1% = "
          "flush + full reload (drops every connection entry's destination).")
    print(json.dumps({f"{a}/{b}": round(v, 4) for (a, b), v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
