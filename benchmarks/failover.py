#!/usr/bin/env python3
"""LVS failover, side by side: graceful keepalived stop, frozen MASTER, powered-off MASTER.

    OPENCLB_LAB_NAME=ha python benchmarks/failover.py [--scenarios stop,freeze,halt]
                                                      [--advert-int 1,0.1] [--held 50]

Needs the lab converged as for tests/lab/test_ha.py (lvs1, lvs2, be1, be2).
For every advert interval and scenario: one traffic run (held keep-alive
connections through the NAT and the DR listener, a new connection every
50 ms), the MASTER fails once its connections are warm and comes back 8 s
later. Prints, per row: the new-connection failover gap, the longest gap
after the failed node returned, the share of held connections preserved
(NAT / DR) and the VRRP transitions of the peer.

--advert-int values other than the model's are applied for the run only
(keepalived.conf edited in place on both nodes and reloaded, restored at
the end): to compare intervals without re-running Ansible. The figures are
for one shared 2-core host running UML guests: compare rows of one run.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lab"))

import test_ha as ha  # noqa: E402  (the lab test's traffic and failure helpers)

SCENARIOS = {
    "stop": (lambda h: ha.on(h, "systemctl stop keepalived"), lambda h: ha.on(h, "systemctl start keepalived"), 30),
    "freeze": (lambda h: ha.cli("freeze", h), lambda h: ha.cli("thaw", h), 35),
    "halt": (lambda h: ha.cli("halt", h), ha.boot, 90),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="stop,freeze,halt")
    ap.add_argument("--advert-int", default="1")
    ap.add_argument("--held", type=int, default=50)
    args = ap.parse_args()
    ha.HELD = args.held
    original = ha.on("lvs1", "grep -m1 -E '^ *advert_int' /etc/keepalived/keepalived.conf").split()[1]
    rows = []
    try:
        for advert in args.advert_int.split(","):
            ha.set_advert(advert)
            for name in args.scenarios.split(","):
                fail, recover, duration = SCENARIOS[name]
                report, master, peer, _ = ha.run_scenario(fail, recover, duration)
                g = report["groups"]
                rows.append(
                    (
                        advert,
                        name,
                        master,
                        report["failover_gap"],
                        report["recovery_gap"],
                        f"{g['nat']['eligible_alive']}/{g['nat']['eligible']}",
                        f"{g['dr']['eligible_alive']}/{g['dr']['eligible']}",
                        " ".join(t[1] for t in report["flaps_after"][peer]),
                    )
                )
                print(rows[-1], flush=True)
                ha.settled_master()
    finally:
        ha.set_advert(original)
    print(
        f"\nfailover, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{args.held} NAT + {args.held} DR held connections, sync_threshold 3 50, nopreempt"
    )
    head = (
        "advert_int",
        "scenario",
        "failed",
        "new-conn gap s",
        "gap after return s",
        "NAT kept",
        "DR kept",
        "peer transitions",
    )
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for row in rows:
        print(" | ".join(str(x) for x in row))


if __name__ == "__main__":
    main()
