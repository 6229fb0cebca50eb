"""The lab reads its topology from the inventory: parsing and its checks."""

import subprocess
from pathlib import Path

import pytest
from openclb_lab import topology
from openclb_lab.lab import Lab, _tap
from openclb_lab.probe import _who

NETWORKS = {
    "mgmt": {"bridge": "br-mgmt", "subnet": "10.98.0.0/24", "lab_address": "10.98.0.1/24"},
    "front": {"bridge": "br-front", "subnet": "203.0.113.0/24"},
    "internal": {"bridge": "br-int", "subnet": "10.99.0.0/24"},
}


def inventory(hosts: dict, groups: dict) -> dict:
    common = {"lab_networks": NETWORKS, "lab_default_gateway": "10.99.0.1"}
    inv = {"_meta": {"hostvars": {h: {**common, **hv} for h, hv in hosts.items()}}}
    inv.update({g: {"hosts": members} for g, members in groups.items()})
    return inv


def test_guests_clients_and_gateways():
    topo = topology.parse(inventory(
        {"lvs1": {"lab_nics": {"mgmt": "10.98.0.11/24", "front": "203.0.113.11/24", "internal": "10.99.0.11/24"}},
         "be1": {"lab_nics": {"mgmt": "10.98.0.41/24", "internal": "10.99.0.41/24"}},
         "client1": {"lab_client": True, "lab_nics": {"front": ["203.0.113.101/24", "203.0.113.102/24"]}}},
        {"lvs_nodes": ["lvs1"], "backends": ["be1"], "clients": ["client1"]}))
    assert [h.name for h in topo.guests] == ["be1", "lvs1"]
    assert [h.name for h in topo.clients] == ["client1"]
    # a node on the internal network only routes through the VRRP gateway; an LVS node does not
    assert topo.hosts["be1"].gateway == "10.99.0.1"
    assert topo.hosts["lvs1"].gateway is None
    assert topo.hosts["lvs1"].mgmt_address == "10.98.0.11"
    assert topo.hosts["client1"].nics[0].addresses == ["203.0.113.101/24", "203.0.113.102/24"]
    assert topo.hosts["be1"].groups == ["backends"]


@pytest.mark.parametrize("nics, message", [
    ({"mgmt": "10.98.0.11/24", "dmz": "10.1.0.1/24"}, "be1: lab_nics.dmz: unknown network"),
    ({"mgmt": "10.98.0.11/24", "internal": "10.1.0.1/24"}, "be1: lab_nics.internal: 10.1.0.1/24 is outside 10.99.0.0/24"),
    ({"internal": "10.99.0.41/24"}, "be1: a guest needs a mgmt address in lab_nics"),
])
def test_bad_topology_names_host_and_field(nics, message):
    with pytest.raises(topology.TopologyError, match=message.replace(".", r"\.").replace("/", "/")):
        topology.parse(inventory({"be1": {"lab_nics": nics}}, {"backends": ["be1"]}))


def test_lab_inventory_is_a_valid_topology():
    """The real lab inventory, through ansible-inventory, as `openclb-lab up` reads it."""
    topo = topology.load()
    assert {"lvs_nodes", "l7_nodes", "backends"} <= {g for h in topo.hosts.values() for g in h.groups}
    addresses = [a for h in topo.hosts.values() for n in h.nics for a in n.addresses]
    assert len(addresses) == len(set(addresses)), "an address is used twice in the lab inventory"


def test_tap_names_fit_the_kernel_limit():
    assert len(_tap("a-very-long-host-name", 3)) <= 15


def test_exec_argv_enters_the_lab_namespace_for_guests_and_clients():
    topo = topology.parse(inventory(
        {"be1": {"lab_nics": {"mgmt": "10.98.0.41/24"}},
         "client1": {"lab_client": True, "lab_nics": {"front": "203.0.113.101/24"}}},
        {"backends": ["be1"], "clients": ["client1"]}))
    lab = Lab(topo)
    guest = lab.exec_argv("be1", ["echo", "a b"])
    assert any(f"ip netns exec {topo.name} socat" in a for a in guest)
    assert guest[-2:] == ["10.98.0.41", "echo 'a b'"]
    assert lab.exec_argv("client1", ["true"]) == ["ip", "netns", "exec", f"{topo.name}-client1", "true"]


def test_backend_is_read_from_the_answer():
    assert _who("hello from be10\n", ["be1", "be10"]) == "be10"
    assert _who("be2", ["be1", "be2"]) == "be2"
    assert _who("nobody", ["be1"]) == "?"


def test_cli_rejects_exec_without_command(capsys):
    from openclb_lab.cli import main
    assert main(["exec", "be1"]) == 2
    assert "exec needs a command" in capsys.readouterr().err


def test_guest_boot_script_is_posix_sh():
    script = Path(topology.__file__).parent / "guest" / "openclb-lab-net"
    subprocess.run(["sh", "-n", str(script)], check=True)
