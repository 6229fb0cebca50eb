"""openclb-lab: the project's local lab of UML guests ("Molecule VMs" with real IPVS).

    openclb-lab up [HOST ...]        build/reuse the image, create the networks, boot guests
    openclb-lab down                 remove every guest, tap, bridge, namespace and temp file
    openclb-lab status [--json]      what runs
    openclb-lab ssh HOST             interactive shell (client hosts: a shell in their namespace)
    openclb-lab exec HOST -- CMD     run CMD on HOST, exit status passed through
    openclb-lab freeze|thaw HOST     hard failure: the guest kernel stops answering / resumes
    openclb-lab halt HOST            power off at once (no clean shutdown)
    openclb-lab boot HOST            boot a halted guest again (its disk is kept)
    openclb-lab cut|restore HOST NET take a guest's link on network NET down / up (inside the guest)
    openclb-lab image                build (or show) the cached guest image

The topology comes from the lab inventory (inventories/lab); OPENCLB_LAB_NAME
names the lab (default "openclb": its network namespace), so several labs can
run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from . import image, topology
from .lab import Lab, LabError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openclb-lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--inventory", default=str(topology.DEFAULT_INVENTORY), help="lab inventory")
    sub = p.add_subparsers(dest="verb", required=True)
    up = sub.add_parser("up", help="boot the lab (or the named guests)")
    up.add_argument("hosts", nargs="*")
    sub.add_parser("down", help="remove everything the lab made")
    st = sub.add_parser("status", help="what runs")
    st.add_argument("--json", action="store_true")
    sub.add_parser("image", help="build or show the cached guest image")
    for verb in ("ssh", "freeze", "thaw", "halt", "boot"):
        sub.add_parser(verb).add_argument("host")
    ex = sub.add_parser("exec", help="run a command on a host")
    ex.add_argument("host")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    for verb in ("cut", "restore"):
        c = sub.add_parser(verb, help="take a guest's link down/up from inside the guest")
        c.add_argument("host")
        c.add_argument("network")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "image":
        print(image.ensure_image())
        return 0
    try:
        lab = Lab(topology.load(topology.Path(args.inventory)))
        return _dispatch(lab, args)
    except (LabError, topology.TopologyError) as e:
        print(f"openclb-lab: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"openclb-lab: {' '.join(map(str, e.cmd))} failed with status {e.returncode}", file=sys.stderr)
        return 2


def _dispatch(lab: Lab, args) -> int:
    verb = args.verb
    if verb == "up":
        lab.up(args.hosts or None)
    elif verb == "down":
        lab.down()
    elif verb == "status":
        rows = lab.status()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"lab {lab.ns} ({'up' if lab.netns_exists() else 'down'})")
            for r in rows:
                print(f"  {r['host']:<10} {r['state']:<8} {str(r['pid'] or '-'):<8} {r['address'] or '-':<20} {r['kind']}")
    elif verb in ("ssh", "exec"):
        cmd = args.cmd[1:] if verb == "exec" and args.cmd[:1] == ["--"] else getattr(args, "cmd", [])
        if verb == "exec" and not cmd:
            print("openclb-lab: exec needs a command: openclb-lab exec HOST -- CMD", file=sys.stderr)
            return 2
        argv = lab.exec_argv(args.host, cmd, tty=(verb == "ssh"))
        os.execvp(argv[0], argv)  # exit status passed through
    elif verb == "freeze":
        lab.freeze(lab.host(args.host))
    elif verb == "thaw":
        lab.thaw(lab.host(args.host))
    elif verb == "halt":
        lab.halt(lab.host(args.host))
    elif verb == "boot":
        lab.up([args.host])
    elif verb in ("cut", "restore"):
        host = lab.host(args.host)
        if args.network == "mgmt":
            raise LabError("cutting mgmt would cut the lab's own access to the guest: use freeze or halt")
        state = "down" if verb == "cut" else "up"
        return subprocess.call(lab.exec_argv(host.name, ["ip", "link", "set", args.network, state]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
