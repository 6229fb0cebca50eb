# Copyright: openclb developers
# Apache-2.0
"""Hold the VIPs of L7 listeners on the loopback (IPVS direct routing).

The LVS tier forwards frames addressed to a VIP unchanged to an L7 node, so
the node must accept the VIP locally without answering ARP for it
(arp_ignore=1 / arp_announce=2 are set by the role). Reads the wanted VIPs
from a JSON list, adds the missing ones to `lo`, removes the ones it added
before that are no longer wanted (recorded in a state file, so addresses
someone else put on lo are never touched) and prints what it did as JSON.

    openclb-l7-vips --vips /etc/openclb/l7-vips.json --state /var/lib/openclb/l7-vips.applied [--check]
"""

import argparse
import ipaddress
import json
import os
import subprocess
import sys


def on_lo():
    out = subprocess.run(["ip", "-j", "addr", "show", "dev", "lo"], check=True, capture_output=True, text=True).stdout
    addrs = set()
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            addrs.add(str(ipaddress.ip_address(a["local"])))
    return addrs


def prefix(addr):
    return f"{addr}/{128 if ':' in addr else 32}"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--vips", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    with open(args.vips, encoding="utf-8") as fh:
        wanted = [str(ipaddress.ip_address(v)) for v in json.load(fh)]
    try:
        with open(args.state, encoding="utf-8") as fh:
            applied = set(json.load(fh))
    except (FileNotFoundError, ValueError):
        applied = set()
    present = on_lo()
    add = [v for v in wanted if v not in present]
    remove = sorted(v for v in applied - set(wanted) if v in present)
    if not args.check:
        for v in add:
            subprocess.run(["ip", "addr", "add", prefix(v), "dev", "lo"], check=True)
        for v in remove:
            subprocess.run(["ip", "addr", "del", prefix(v), "dev", "lo"], check=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.state)), exist_ok=True)
        with open(args.state + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(sorted(set(wanted)), fh)
        os.replace(args.state + ".tmp", args.state)
    print(json.dumps({"changed": bool(add or remove), "added": add, "removed": remove}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
