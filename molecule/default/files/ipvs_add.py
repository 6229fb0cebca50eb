"""Add one IPVS TCP service with one masqueraded real server over netlink (pyroute2)."""

import socket
import sys

from pyroute2 import IPVS, IPVSDest, IPVSService

vip, port, rip, rport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
svc = IPVSService(addr=vip, port=port, protocol=socket.IPPROTO_TCP, sched_name="rr")
with IPVS() as ipvs:
    existing = [s for s in ipvs.service("dump")
                if s.get_attr("IPVS_CMD_ATTR_SERVICE").get_attr("IPVS_SVC_ATTR_ADDR") == vip]
    if existing:
        print("present")
        sys.exit(0)
    ipvs.service("add", service=svc)
    ipvs.dest("add", service=svc, dest=IPVSDest(addr=rip, port=rport, weight=1))
    print("added")
