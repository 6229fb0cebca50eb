#!/usr/bin/python
# Copyright: openclb developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: ipvs_info
short_description: Read the IPVS table, real server connection counters and sync daemon state over netlink
version_added: "0.1.0"
description:
  - Dumps IPVS services, their real servers (with active, inactive and persistent connection counts) and
    the running connection sync daemons through generic netlink (pyroute2). Never runs C(ipvsadm).
  - Does not load C(ip_vs); when the module is not loaded it returns RV(loaded=false) and empty lists.
author:
  - openclb developers (@openclb)
attributes:
  check_mode:
    support: full
    details: Read-only.
  diff_mode:
    support: none
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
  - openclb.lb.ipvs
options:
  stats:
    description:
      - Include the traffic counters of services and real servers (connections, packets, bytes and their rates).
      - Active, inactive and persistent connection counts of real servers are always returned.
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Read IPVS state
  openclb.lb.ipvs_info:
  register: ipvs

- name: Show real servers with active connections
  ansible.builtin.debug:
    msg: "{{ item.0.address }}:{{ item.0.port }} -> {{ item.1.address }} active {{ item.1.active_conns }}"
  loop: "{{ ipvs.services | subelements('real_servers') }}"
"""

RETURN = r"""
loaded:
  description: Whether the IPVS netlink family exists (C(ip_vs) loaded).
  returned: always
  type: bool
services:
  description: Every kernel service, sorted by protocol, address, port (firewall-mark services last).
  returned: always
  type: list
  elements: dict
  sample:
    - protocol: tcp
      fwmark: null
      family: 4
      address: 203.0.113.10
      port: 80
      scheduler: wrr
      persistence: 0
      persistence_netmask: 32
      flags: []
      stats: {conns: 12, inpkts: 120, outpkts: 0, inbytes: 8000, outbytes: 0,
              cps: 0, inpps: 0, outpps: 0, inbps: 0, outbps: 0}
      real_servers:
        - address: 10.99.0.21
          port: 8080
          forwarding: nat
          weight: 1
          upper_threshold: 0
          lower_threshold: 0
          active_conns: 3
          inactive_conns: 1
          persist_conns: 0
          stats: {conns: 6, inpkts: 60, outpkts: 50, inbytes: 4000, outbytes: 9000,
                  cps: 0, inpps: 0, outpps: 0, inbps: 0, outbps: 0}
sync_daemons:
  description: Running connection sync daemons (at most one master and one backup).
  returned: always
  type: list
  elements: dict
  sample:
    - {role: master, interface: eth1, syncid: 1, maxlen: 1472, mcast_group: 224.0.0.81, port: 8848, ttl: 1}
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.openclb.lb.plugins.module_utils.ipvs import (  # noqa: E402
    IPVSError,
    NetlinkError,
    open_kernel,
    read_daemons,
    read_services,
)


def build_module():
    return AnsibleModule(
        argument_spec=dict(stats=dict(type="bool", default=True)),
        supports_check_mode=True,
    )


def main():
    module = build_module()
    kernel = open_kernel(module, load_module=False)
    try:
        services = read_services(kernel, with_stats=True)
        daemons = read_daemons(kernel)
    except (IPVSError, NetlinkError) as exc:
        module.fail_json(msg=f"reading IPVS state failed: {exc}")
    finally:
        kernel.close()
    if not module.params["stats"]:  # connection counts stay: they are what draining watches
        for svc in services:
            svc.pop("stats")
            for rs in svc["real_servers"]:
                rs.pop("stats")
    module.exit_json(changed=False, loaded=kernel.available, services=services, sync_daemons=daemons)


if __name__ == "__main__":
    main()
