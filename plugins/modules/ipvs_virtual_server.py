#!/usr/bin/python
# Copyright: openclb developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ipvs_virtual_server
short_description: Manage one IPVS virtual service and its real servers over netlink
version_added: "0.1.0"
description:
  - Creates, changes or removes one IPVS virtual service (TCP/UDP/SCTP address and port, or a firewall mark)
    and its complete set of real servers, talking generic netlink to the kernel through pyroute2. It never
    runs C(ipvsadm).
  - Reads the kernel table, compares it with the wanted service and sends only the difference. Scheduler,
    persistence and flag changes use C(IPVS_CMD_SET_SERVICE); weight, threshold and forwarding changes use
    C(IPVS_CMD_SET_DEST), so established connections are untouched. A real server that is no longer listed
    is deleted (unless O(purge_real_servers=false)).
  - Loads the C(ip_vs) kernel module with C(modprobe) when the IPVS generic netlink family is missing
    (not in check mode, where a missing family reads as an empty table).
  - To manage many services in one run use M(openclb.lb.ipvs_services).
author:
  - openclb developers (@openclb)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: Before and after of the service and its real servers (keyed by C(address:port)).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - openclb.lb.ipvs
options:
  protocol:
    description:
      - Transport protocol of an address/port service. Defaults to V(tcp). Not allowed with O(fwmark).
    type: str
    choices: [tcp, udp, sctp]
  address:
    description:
      - Virtual IP address, IPv4 or IPv6. Required unless O(fwmark) is used.
    type: str
  port:
    description:
      - Virtual port; V(0) makes a port-less (all ports) service, usually with persistence.
      - Required with O(address).
    type: int
  fwmark:
    description:
      - Firewall-mark service instead of address/port. Mutually exclusive with O(address), O(port), O(protocol).
    type: int
  family:
    description:
      - Address family of a firewall-mark service (V(ipv4) when omitted). With O(address) it must match it.
    type: str
    choices: [ipv4, ipv6]
  scheduler:
    description:
      - IPVS scheduler name, for example V(rr), V(wrr), V(lc), V(wlc), V(sh), V(dh), V(mh), V(sed), V(nq),
        V(fo), V(ovf), V(lblc), V(lblcr), V(twos). The kernel loads C(ip_vs_<name>) on demand.
    type: str
    default: wlc
  persistence:
    description:
      - Persistence (client affinity) timeout in seconds, V(0) for none. Sets the persistent flag.
    type: int
    default: 0
  persistence_netmask:
    description:
      - Granularity of persistence. IPv4 a prefix length (V(24)) or a dotted mask (V(255.255.255.0));
        IPv6 a prefix length. Default is the full host address.
    type: str
  flags:
    description:
      - Service flags. V(one-packet) schedules every UDP datagram separately.
      - V(sh-fallback)/V(sh-port) (scheduler V(sh)) and V(mh-fallback)/V(mh-port) (scheduler V(mh)) as in
        C(ipvsadm -b); V(sched1), V(sched2), V(sched3) are the raw scheduler flags.
    type: list
    elements: str
    default: []
    choices: [mh-fallback, mh-port, one-packet, sched1, sched2, sched3, sh-fallback, sh-port]
  real_servers:
    description:
      - The real servers of this service.
    type: list
    elements: dict
    default: []
    suboptions:
      address:
        description: Real server address. It must be of the service family unless O(real_servers[].forwarding=tun).
        type: str
        required: true
      port:
        description:
          - Real server port. Defaults to the service port. With V(dr) and V(tun) it must equal the service port.
        type: int
      forwarding:
        description:
          - Forwarding method. V(nat) (masquerading), V(dr) (direct routing), V(tun) (IP-in-IP tunnel).
            V(masq), V(route) and V(ipip) are accepted aliases.
        type: str
        default: nat
        choices: [nat, dr, tun, masq, route, ipip]
      weight:
        description: Weight; V(0) quiesces the server (no new connections, existing ones continue).
        type: int
        default: 1
      upper_threshold:
        description: Upper connection threshold, V(0) for none.
        type: int
        default: 0
      lower_threshold:
        description: Lower connection threshold, V(0) for none.
        type: int
        default: 0
      state:
        description: V(absent) lists a server only to make sure it is removed.
        type: str
        default: present
        choices: [present, absent]
  purge_real_servers:
    description:
      - Delete real servers of this service that are not listed in O(real_servers).
    type: bool
    default: true
  state:
    description:
      - V(present) creates or updates the service, V(absent) deletes it with all its real servers.
    type: str
    default: present
    choices: [present, absent]
notes:
  - Removing a real server deletes it from the service; its existing connections are dropped at the kernel's
    discretion (expire_nodest_conn). To drain first, set its O(real_servers[].weight=0) in an earlier run.
  - Do not manage the same service with this module and with keepalived C(virtual_server); see
    C(docs/ipvs-modules.md) for ownership rules.
seealso:
  - module: openclb.lb.ipvs_services
  - module: openclb.lb.ipvs_info
"""

EXAMPLES = r"""
- name: HTTP on a VIP, weighted round robin, NAT to two backends
  openclb.lb.ipvs_virtual_server:
    address: 203.0.113.10
    port: 80
    scheduler: wrr
    real_servers:
      - {address: 10.99.0.21, port: 8080, weight: 1}
      - {address: 10.99.0.22, port: 8080, weight: 3}

- name: DNS over UDP, one datagram per scheduling decision, direct routing
  openclb.lb.ipvs_virtual_server:
    protocol: udp
    address: 2001:db8::53
    port: 53
    scheduler: rr
    flags: [one-packet]
    real_servers:
      - {address: "2001:db8:1::21", forwarding: dr}
      - {address: "2001:db8:1::22", forwarding: dr}

- name: All ports marked 7 by iptables, source hashing with port fallback, 10-minute persistence per /24
  openclb.lb.ipvs_virtual_server:
    fwmark: 7
    scheduler: sh
    flags: [sh-fallback]
    persistence: 600
    persistence_netmask: 24
    real_servers:
      - {address: 10.99.0.21, forwarding: dr}

- name: Drain a backend (weight 0) without touching the others
  openclb.lb.ipvs_virtual_server:
    address: 203.0.113.10
    port: 80
    scheduler: wrr
    purge_real_servers: false
    real_servers:
      - {address: 10.99.0.21, port: 8080, weight: 0}

- name: Remove the service
  openclb.lb.ipvs_virtual_server:
    address: 203.0.113.10
    port: 80
    state: absent
"""

RETURN = r"""
actions:
  description: What was (or in check mode would be) sent to the kernel, one line per netlink request.
  returned: always
  type: list
  elements: str
  sample:
    - add service tcp 203.0.113.10:80 scheduler wrr
    - add real server tcp 203.0.113.10:80 -> 10.99.0.21:8080 nat weight 1
    - set real server tcp 203.0.113.10:80 -> 10.99.0.22:8080 (weight 1 -> 3)
service:
  description: The service as it is after the run; empty when O(state=absent).
  returned: always
  type: dict
  sample:
    protocol: tcp
    family: 4
    address: 203.0.113.10
    port: 80
    scheduler: wrr
    persistence: 0
    persistence_netmask: 32
    flags: []
    real_servers:
      "10.99.0.21:8080": {forwarding: nat, weight: 1, upper_threshold: 0, lower_threshold: 0}
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.openclb.lb.plugins.module_utils.ipvs import (  # noqa: E402
    SERVICE_MUTUALLY_EXCLUSIVE,
    SERVICE_REQUIRED_ONE_OF,
    run_services_module,
    service_spec,
)


def build_module():
    return AnsibleModule(
        argument_spec=service_spec(),
        mutually_exclusive=SERVICE_MUTUALLY_EXCLUSIVE,
        required_one_of=SERVICE_REQUIRED_ONE_OF,
        required_by={"address": "port"},
        supports_check_mode=True,
    )


def main():
    module = build_module()
    run_services_module(module, [dict(module.params)], purge=False, single=True)


if __name__ == "__main__":
    main()
