#!/usr/bin/python
# Copyright: openclb developers
# Apache License 2.0 (see galaxy.yml)
# The work happens in the action plugin plugins/action/validate_model.py (on
# the controller); this file holds its documentation, as Ansible requires.

from __future__ import annotations

DOCUMENTATION = r"""
module: validate_model
short_description: Validate the openclb load-balancer model before anything changes
version_added: 0.1.0
author: openclb developers
description:
  - Checks the model described by the inventory variables C(openclb_cluster), C(openclb_server_groups)
    and C(openclb_listeners) together with the node addresses of the inventory groups C(lvs_nodes),
    C(l7_nodes), C(key_servers) and C(backends) (host variables C(openclb_front_address),
    C(openclb_internal_address)).
  - "Fails listing every error, each naming the listener and the field, for example
    C(listeners[tcp-web].health_check.interval: 0 is out of range 1-50)."
  - Runs on the controller and never changes anything. The rules are documented in docs/model.md.
options:
  cluster:
    description: The cluster part of the model. Defaults to the variable C(openclb_cluster).
    type: dict
  server_groups:
    description: The server groups. Defaults to the variable C(openclb_server_groups).
    type: dict
  listeners:
    description: The listeners. Defaults to the variable C(openclb_listeners).
    type: list
    elements: dict
  publish:
    description:
      - Instead of the summary, return the normalised model as the fact C(openclb_model).
      - With C(run_once) Ansible gives that fact to every host of the play, so the tiers render from one
        computed model. The result is not shown with C(-v) (it is large).
    type: bool
    default: false
attributes:
  action:
    support: full
  async:
    support: none
  check_mode:
    support: full
  diff_mode:
    support: none
  platform:
    platforms: all
notes:
  - The filter C(openclb.lb.lb_model) returns the normalised model the roles render from.
"""

EXAMPLES = r"""
- name: Validate the load-balancer model
  openclb.lb.validate_model:

- name: Give every host of the play the normalised model as openclb_model
  openclb.lb.validate_model:
    publish: true
  run_once: true

- name: Validate a candidate listener list before committing it to the inventory
  openclb.lb.validate_model:
    listeners: "{{ candidate_listeners }}"
"""

RETURN = r"""
summary:
  description: Counts of the valid model.
  returned: success
  type: dict
  sample:
    cluster: lab
    listeners: {tcp: 4, udp: 1, http: 2, https: 1}
    ipvs_services: 8
    real_servers: 22
    vips: [203.0.113.10, 203.0.113.20, 203.0.113.30]
    server_groups: 5
ansible_facts:
  description: The normalised model (docs/model.md).
  returned: with O(publish=true)
  type: dict
  contains:
    openclb_model:
      description: cluster, nodes, server_groups, listeners, ipvs_services, vips, vrrp_instances, ...
      type: dict
errors:
  description: "Every error found, each C(path: problem)."
  returned: failure
  type: list
  elements: str
  sample: ["listeners[tcp-web].health_check.interval: 0 is out of range 1-50"]
"""
