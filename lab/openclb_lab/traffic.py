"""`openclb-lab traffic`: real traffic from a client host to every listener.

Reads the normalised model the playbooks use (the `openclb.lb.lb_model`
filter over the lab inventory), sends a bounded burst to each listener from a
client namespace and prints a table: listener, protocol, VIP:port, requests
sent/ok and how they spread over backends. The same result goes to a JSON
file. With no listeners it still checks that every guest answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .lab import Lab
from .topology import REPO
from .util import log

MODEL_EXPR = ("{{ {'cluster': openclb_cluster | default({}), 'server_groups': openclb_server_groups | default({}),"
              " 'listeners': openclb_listeners | default([])} | openclb.lb.lb_model(groups, hostvars) | to_json }}")


def load_model(inventory: Path) -> dict:
    """The normalised model, computed by the same filter the playbooks use."""
    venv_bin = Path(sys.executable).parent
    env = dict(os.environ, ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.builtin.json",
               ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), PATH=f"{venv_bin}:{os.environ.get('PATH', '')}")
    res = subprocess.run([str(venv_bin / "ansible"), "-i", str(inventory), "localhost", "-m", "ansible.builtin.debug",
                          "-a", f"msg={MODEL_EXPR}"], capture_output=True, text=True, env=env, cwd=REPO, check=False,
                         stdin=subprocess.DEVNULL)
    try:
        out = json.loads(res.stdout)
        result = out["plays"][0]["tasks"][0]["hosts"]["localhost"]
    except (ValueError, KeyError, IndexError):
        raise SystemExit(f"could not compute the model:\n{res.stdout[-2000:]}{res.stderr[-2000:]}") from None
    if result.get("failed"):
        raise SystemExit(f"the model does not validate:\n{result.get('msg')}")
    msg = result["msg"]
    return json.loads(msg) if isinstance(msg, str) else msg


def run_traffic(lab: Lab, inventory: Path, count: int, client: str, json_path: Path | None) -> int:
    model = load_model(inventory)
    listeners = model.get("listeners", [])
    backend_names = sorted(lab.topo.hosts[n].name for n in lab.topo.hosts if "backends" in lab.topo.hosts[n].groups)
    rows = []
    reach = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        reach = list(pool.map(lambda h: (h.name, lab.ssh_ready(h)), lab.topo.guests))
    unreachable = [n for n, ok in reach if not ok]
    log(f"{len(reach) - len(unreachable)}/{len(reach)} guests answer over ssh"
        + (f"; unreachable: {', '.join(unreachable)}" if unreachable else ""))
    if not listeners:
        log("no listeners in the model yet: the lab is up and every guest was reached" if not unreachable else
            "no listeners in the model yet")
    client_host = lab.host(client)
    for lst in listeners:
        argv = lab.exec_argv(client_host.name, [
            sys.executable, "-m", "openclb_lab.probe", lst["protocol"], lst["vip"], str(lst["port"]),
            "--count", str(count), "--names", ",".join(backend_names)])
        # no Host header of a rule: the listener's default server group answers
        res = subprocess.run(argv, capture_output=True, text=True, timeout=count * 10 + 60, check=False,
                             stdin=subprocess.DEVNULL)
        try:
            result = json.loads(res.stdout)
        except ValueError:
            result = {"sent": count, "ok": 0, "spread": {}, "errors": {"probe failed": res.stderr[-300:]}}
        rows.append({"listener": lst["name"], "protocol": lst["protocol"], "vip": lst["vip"], "port": lst["port"],
                     **result})
    _print_table(rows)
    report = {"lab": lab.ns, "client": client, "guests_reachable": len(reach) - len(unreachable),
              "guests": len(reach), "unreachable": unreachable, "listeners": rows}
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        log(f"written {json_path}")
    failed = [r["listener"] for r in rows if r["ok"] < r["sent"]]
    if failed or unreachable:
        log(f"FAILED: {', '.join(failed + unreachable)}. Next: `openclb-lab status`, "
            f"`openclb-lab exec HOST -- journalctl -u keepalived -u nginx -n 50`")
        return 1
    return 0


def _print_table(rows: list[dict]) -> None:
    head = f"{'listener':<16} {'proto':<6} {'VIP:port':<22} {'sent':>5} {'ok':>5}  spread over backends"
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = "  ".join(f"{k}:{v}" for k, v in r["spread"].items()) or "-"
        errors = "  ".join(f"{k}:{v}" for k, v in r["errors"].items())
        print(f"{r['listener']:<16} {r['protocol']:<6} {r['vip'] + ':' + str(r['port']):<22} {r['sent']:>5} "
              f"{r['ok']:>5}  {spread}" + (f"  ERRORS {errors}" if errors else ""))
    if not rows:
        print("(no listeners in the model)")
