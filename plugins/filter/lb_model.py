# Copyright: openclb developers
# Apache License 2.0 (see galaxy.yml)
"""Filter openclb.lb.lb_model: the normalised load-balancer model."""

from __future__ import annotations

DOCUMENTATION = r"""
name: lb_model
short_description: Validate and normalise the openclb load-balancer model
version_added: 0.1.0
author: openclb developers
description:
  - Takes the raw model (C(cluster), C(server_groups), C(listeners), from the inventory variables
    C(openclb_cluster), C(openclb_server_groups), C(openclb_listeners)) and returns the normalised
    form every tier renders from (see docs/model.md). Node addresses come from the inventory groups
    C(lvs_nodes), C(l7_nodes), C(key_servers), C(backends) and the host variables
    C(openclb_front_address) and C(openclb_internal_address).
  - Fails listing every error of the model, each naming the listener and the field.
options:
  _input:
    description: The raw model, a mapping with the keys C(cluster), C(server_groups), C(listeners).
    type: dict
    required: true
  groups:
    description: The magic variable C(groups).
    type: dict
    required: true
  hostvars:
    description: The magic variable C(hostvars).
    type: dict
    required: true
"""

EXAMPLES = r"""
- name: Render from the normalised model
  vars:
    openclb_model: >-
      {{ {'cluster': openclb_cluster, 'server_groups': openclb_server_groups, 'listeners': openclb_listeners}
         | openclb.lb.lb_model(groups, hostvars) }}
  ansible.builtin.debug:
    msg: "{{ openclb_model.ipvs_services | map(attribute='listener') }}"
"""

RETURN = r"""
_value:
  description: The normalised model (cluster, nodes, server_groups, listeners, ipvs_services, ipvs_timeouts, vips, l7_listeners).
  type: dict
"""

from ansible.errors import AnsibleFilterError  # noqa: E402 - Ansible wants DOCUMENTATION first
from ansible_collections.openclb.lb.plugins.module_utils import model as lb  # noqa: E402


def lb_model(raw, groups, hostvars):
    if not isinstance(raw, dict):
        raise AnsibleFilterError(f"lb_model expects a mapping with cluster, server_groups, listeners; got {raw!r}")
    try:
        return lb.normalize(raw, lb.nodes_from_inventory(groups, hostvars))
    except lb.ModelError as exc:
        raise AnsibleFilterError(str(exc)) from exc


class FilterModule:
    def filters(self):
        return {"lb_model": lb_model}
