"""The lb_model filter and the validate_model action, through Ansible.

The filter is called directly and from a playbook; the action only from a
playbook (that is how it runs: on the controller, with task vars). The lab
inventory must validate, and a broken copy of it must fail naming the field.
"""

from __future__ import annotations

import os
import shutil

import pytest
import yaml
from ansible.errors import AnsibleFilterError
from ansible_collections.openclb.lb.plugins.filter.lb_model import FilterModule, lb_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4))
LAB = os.path.join(ROOT, "inventories", "lab")

GROUPS = {"all": ["lvs1", "l7-1", "be1"], "lvs_nodes": ["lvs1"], "l7_nodes": ["l7-1"], "backends": ["be1"]}
HOSTVARS = {
    "lvs1": {"openclb_front_address": "203.0.113.11", "openclb_internal_address": "10.99.0.11"},
    "l7-1": {"openclb_internal_address": "10.99.0.21"},
    "be1": {"openclb_internal_address": "10.99.0.41"},
}
RAW = {
    "cluster": {"name": "t"},
    "server_groups": {"web": {"members": [{"host": "be1", "port": 8080}]}},
    "listeners": [
        {"name": "web", "protocol": "tcp", "vip": "203.0.113.10", "port": 80, "server_group": "web"},
        {"name": "site", "protocol": "http", "vip": "203.0.113.10", "port": 8080, "server_group": "web"},
    ],
}


def test_filter_is_registered():
    assert FilterModule().filters() == {"lb_model": lb_model}


def test_filter_returns_the_normalised_model():
    got = lb_model(RAW, GROUPS, HOSTVARS)
    assert [s["real_servers"][0]["address"] for s in got["ipvs_services"]] == ["10.99.0.41", "10.99.0.21"]
    assert [lst["name"] for lst in got["l7_listeners"]] == ["site"]


def test_filter_lists_every_error():
    raw = dict(RAW, listeners=[dict(RAW["listeners"][0], port=0, scheduler="x")])
    with pytest.raises(AnsibleFilterError) as exc:
        lb_model(raw, GROUPS, HOSTVARS)
    assert "listeners[web].port: 0 is out of range 1-65535" in str(exc.value)
    assert "listeners[web].scheduler: 'x' is not one of" in str(exc.value)


def test_filter_rejects_a_non_mapping():
    with pytest.raises(AnsibleFilterError, match="expects a mapping"):
        lb_model([], GROUPS, HOSTVARS)


@pytest.fixture
def broken_lab(tmp_path):
    inv = tmp_path / "lab"
    shutil.copytree(LAB, inv)
    path = inv / "group_vars" / "all" / "openclb.yml"
    data = yaml.safe_load(path.read_text())
    tcp_web = next(lst for lst in data["openclb_listeners"] if lst["name"] == "tcp-web")
    tcp_web["health_check"]["interval"] = 0
    tcp_web["health_check"]["intervall"] = 3
    https = next(lst for lst in data["openclb_listeners"] if lst["name"] == "https-web")
    https["tls_policy"] = "tls_1_3"
    data["openclb_server_groups"]["web"]["members"][0]["host"] = "be9"
    path.write_text(yaml.safe_dump(data))
    return str(inv)


def test_validate_play_passes_on_the_lab_model(ansible_playbook):
    res = ansible_playbook(LAB, os.path.join(ROOT, "playbooks", "validate.yml"), "--check", "-v")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "model lab is valid: 5 tcp, 1 udp, 3 http, 2 https; 11 IPVS services, 26 real servers, 3 VIPs" in res.stdout
    assert "ok=2    changed=0" in res.stdout


SITE = """
- name: Validate
  ansible.builtin.import_playbook: {validate}
- name: A tier
  hosts: l7_nodes
  gather_facts: false
  tasks:
    - name: Read the published model
      ansible.builtin.debug:
        msg: "{{{{ inventory_hostname }}}} sees {{{{ openclb_model.l7_listeners | map(attribute='name') | join(',') }}}}"
      delegate_to: localhost
"""


def test_limit_cannot_skip_validation_and_every_host_gets_the_model(ansible_playbook, tmp_path, broken_lab):
    # lab guests are not up: passing proves no host is contacted
    site = tmp_path / "site.yml"
    site.write_text(SITE.format(validate=os.path.join(ROOT, "playbooks", "validate.yml")))
    res = ansible_playbook(LAB, str(site), "--limit", "l7-2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "l7-2 sees http-redirect,http-rewrite,http-web,https-strict,https-web" in res.stdout
    res = ansible_playbook(broken_lab, str(site), "--limit", "l7-2")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "listeners[tcp-web].health_check.interval: 0 is out of range 1-50" in res.stdout
    assert " sees " not in res.stdout


def test_validate_play_fails_naming_every_field(ansible_playbook, broken_lab):
    res = ansible_playbook(broken_lab, os.path.join(ROOT, "playbooks", "validate.yml"))
    assert res.returncode == 2, res.stdout + res.stderr
    for line in (
        "4 error(s) in the openclb model",
        "server_groups[web].members[0].host: 'be9' is not a host in the backends group",
        "listeners[tcp-web].health_check.intervall: unknown key (did you mean 'interval'?)",
        "listeners[tcp-web].health_check.interval: 0 is out of range 1-50",
        "listeners[https-web].tls_policy: 'tls_1_3' is not one of",
    ):
        assert line in res.stdout, res.stdout


FILTER_PLAY = """
- name: Use the normalised model
  hosts: localhost
  gather_facts: false
  vars:
    openclb_model: >-
      {{ {'cluster': openclb_cluster, 'server_groups': openclb_server_groups, 'listeners': openclb_listeners}
         | openclb.lb.lb_model(groups, hostvars) }}
  tasks:
    - name: Show what the LVS tier would program
      ansible.builtin.debug:
        msg: "{{ openclb_model.ipvs_services | map(attribute='listener') | join(',') }}
          {{ openclb_model.ipvs_services[0].real_servers | map(attribute='address') | join(',') }}"
"""


def test_filter_in_a_play_resolves_templated_hostvars(ansible_playbook, tmp_path):
    # the lab's addresses are templates over lab_nics: hostvars must resolve them
    play = tmp_path / "filter.yml"
    play.write_text(FILTER_PLAY)
    res = ansible_playbook(LAB, str(play))
    assert res.returncode == 0, res.stdout + res.stderr
    # sorted by VIP, transport, port
    assert (
        "tcp-web,tcp-persist,tcp-acl,tcp-single,udp-echo,http-web,https-web,http-redirect,http-rewrite,https-strict,dr-web "
        "10.99.0.41,10.99.0.42,10.99.0.43"
    ) in res.stdout
