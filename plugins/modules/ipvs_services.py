#!/usr/bin/python
# Copyright: openclb developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ipvs_services
short_description: Manage many IPVS virtual services and their real servers in one run, optionally the whole table
version_added: "0.1.0"
description:
  - The list form of M(openclb.lb.ipvs_virtual_server) with the same per-service semantics, applied in one
    module run over one netlink socket. The kernel table is dumped once, every service is compared, and only
    the differences are sent. All entries are validated before anything is changed.
  - With O(purge=true) the module owns the whole IPVS table of the host; kernel services that are not listed
    are deleted. Do not use O(purge=true) on a host where keepalived C(virtual_server) blocks (or anything
    else) also program IPVS; see C(docs/ipvs-modules.md).
  - Loads C(ip_vs) with C(modprobe) when the IPVS generic netlink family is missing (not in check mode).
author:
  - openclb developers (@openclb)
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: Before and after of every listed (and purged) service, keyed by service id, for example C(tcp 203.0.113.10:80).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - openclb.lb.ipvs
options:
  services:
    description:
      - The wanted services. Each entry takes the options of M(openclb.lb.ipvs_virtual_server).
    type: list
    elements: dict
    required: true
    suboptions:
      protocol:
        description: Transport protocol of an address/port service. Defaults to V(tcp).
        type: str
        choices: [tcp, udp, sctp]
      address:
        description: Virtual IP address, IPv4 or IPv6. Required unless O(services[].fwmark) is used.
        type: str
      port:
        description: Virtual port; required with O(services[].address).
        type: int
      fwmark:
        description: Firewall-mark service instead of address/port.
        type: int
      family:
        description: Address family of a firewall-mark service (V(ipv4) when omitted).
        type: str
        choices: [ipv4, ipv6]
      scheduler:
        description: IPVS scheduler name (V(rr), V(wrr), V(lc), V(wlc), V(sh), V(dh), V(mh), ...).
        type: str
        default: wlc
      persistence:
        description: Persistence timeout in seconds, V(0) for none.
        type: int
        default: 0
      persistence_netmask:
        description: Persistence granularity; prefix length, or a dotted mask for IPv4.
        type: str
      flags:
        description: Service flags, see M(openclb.lb.ipvs_virtual_server).
        type: list
        elements: str
        default: []
        choices: [mh-fallback, mh-port, one-packet, sched1, sched2, sched3, sh-fallback, sh-port]
      real_servers:
        description: The real servers of this service.
        type: list
        elements: dict
        default: []
        suboptions:
          address:
            description: Real server address.
            type: str
            required: true
          port:
            description: Real server port; defaults to the service port (must equal it with V(dr)/V(tun)).
            type: int
          forwarding:
            description: Forwarding method; V(masq), V(route), V(ipip) are aliases of V(nat), V(dr), V(tun).
            type: str
            default: nat
            choices: [nat, dr, tun, masq, route, ipip]
          weight:
            description: Weight; V(0) quiesces the server.
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
        description: Delete real servers of this service that are not listed.
        type: bool
        default: true
      state:
        description: V(absent) deletes the service.
        type: str
        default: present
        choices: [present, absent]
  purge:
    description:
      - Delete every kernel service that is not in O(services). Makes this module the owner of the whole
        IPVS table.
    type: bool
    default: false
notes:
  - Services and real servers are identified by protocol, address and port (or firewall mark and family);
    changing any of those is a delete of the old entry and an add of the new one.
seealso:
  - module: openclb.lb.ipvs_virtual_server
  - module: openclb.lb.ipvs_info
"""

EXAMPLES = r"""
- name: Own the whole table (no keepalived virtual_server on this host); the list comes from a variable
  openclb.lb.ipvs_services:
    purge: true
    services: "{{ lvs_ipvs_services }}"

- name: Two services in one run
  openclb.lb.ipvs_services:
    services:
      - address: 203.0.113.10
        port: 443
        scheduler: mh
        flags: [mh-port]
        real_servers:
          - {address: 10.99.0.31, forwarding: dr}
          - {address: 10.99.0.32, forwarding: dr}
      - protocol: udp
        address: 203.0.113.10
        port: 53
        scheduler: rr
        flags: [one-packet]
        real_servers:
          - {address: 10.99.0.21, port: 5353}

- name: Remove one service, leave everything else alone
  openclb.lb.ipvs_services:
    services:
      - {address: 203.0.113.10, port: 53, protocol: udp, state: absent}
"""

RETURN = r"""
actions:
  description: What was (or in check mode would be) sent to the kernel, one line per netlink request.
  returned: always
  type: list
  elements: str
  sample:
    - del service tcp 203.0.113.99:80
    - set real server tcp 203.0.113.10:443 -> 10.99.0.31:443 (weight 1 -> 5)
services:
  description: The managed services as they are after the run, keyed by service id.
  returned: always
  type: dict
  sample:
    "tcp 203.0.113.10:443":
      protocol: tcp
      family: 4
      address: 203.0.113.10
      port: 443
      scheduler: mh
      persistence: 0
      persistence_netmask: 32
      flags: [mh-port]
      real_servers:
        "10.99.0.31:443": {forwarding: dr, weight: 1, upper_threshold: 0, lower_threshold: 0}
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
        argument_spec=dict(
            services=dict(
                type="list",
                elements="dict",
                required=True,
                options=service_spec(),
                mutually_exclusive=SERVICE_MUTUALLY_EXCLUSIVE,
                required_one_of=SERVICE_REQUIRED_ONE_OF,
                required_by={"address": "port"},
            ),
            purge=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )


def main():
    module = build_module()
    run_services_module(module, module.params["services"], purge=module.params["purge"])


if __name__ == "__main__":
    main()
