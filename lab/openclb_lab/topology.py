"""The lab topology, read from the lab inventory (the single source of truth).

`ansible-inventory` resolves hosts, groups and group_vars exactly as the
playbooks will see them; the lab only needs the literal `lab_*` variables.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_INVENTORY = REPO / "inventories" / "lab"


@dataclass
class Nic:
    network: str
    addresses: list[str]  # address/prefix strings


@dataclass
class Host:
    name: str
    groups: list[str]
    nics: list[Nic]
    client: bool = False  # a plain network namespace instead of a guest
    gateway: str | None = None

    @property
    def mgmt_address(self) -> str | None:
        for nic in self.nics:
            if nic.network == "mgmt":
                return nic.addresses[0].split("/")[0]
        return None


@dataclass
class Network:
    name: str
    bridge: str
    subnet: str
    lab_address: str | None = None


@dataclass
class Topology:
    name: str
    networks: dict[str, Network]
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def guests(self) -> list[Host]:
        return [h for h in self.hosts.values() if not h.client]

    @property
    def clients(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.client]


class TopologyError(Exception):
    pass


def lab_name() -> str:
    return os.environ.get("OPENCLB_LAB_NAME", "openclb")


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def load(inventory: Path = DEFAULT_INVENTORY) -> Topology:
    # the ansible-inventory next to this interpreter (the project's venv), else PATH's
    ansible_inventory = Path(sys.executable).parent / "ansible-inventory"
    cmd = [str(ansible_inventory) if ansible_inventory.exists() else "ansible-inventory", "-i", str(inventory), "--list"]
    # stdin from /dev/null: ansible refuses a non-blocking stdin (see Lab.ensure_master)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL).stdout
    return parse(json.loads(out))


def parse(inv: dict) -> Topology:
    """Build a Topology from `ansible-inventory --list` output, checking it."""
    hostvars = inv.get("_meta", {}).get("hostvars", {})
    groups_of: dict[str, list[str]] = {}
    for group, body in inv.items():
        if group == "_meta" or not isinstance(body, dict):
            continue
        for host in body.get("hosts", []):
            groups_of.setdefault(host, []).append(group)
    if not hostvars:
        raise TopologyError("the lab inventory has no hosts")
    any_vars = next(iter(hostvars.values()))
    raw_networks = any_vars.get("lab_networks")
    if not raw_networks:
        raise TopologyError("lab_networks is not set in the lab inventory (group_vars/all/lab.yml)")
    networks = {
        name: Network(name, spec["bridge"], spec["subnet"], spec.get("lab_address"))
        for name, spec in raw_networks.items()
    }
    topo = Topology(lab_name(), networks)
    for name, hv in sorted(hostvars.items()):
        if "lab_nics" not in hv:
            raise TopologyError(f"{name}: lab_nics is missing")
        nics = []
        for net, addrs in hv["lab_nics"].items():
            if net not in networks:
                raise TopologyError(f"{name}: lab_nics.{net}: unknown network (lab_networks has {sorted(networks)})")
            subnet = ipaddress.ip_network(networks[net].subnet)
            for a in _as_list(addrs):
                iface = ipaddress.ip_interface(a)
                if iface.ip not in subnet:
                    raise TopologyError(f"{name}: lab_nics.{net}: {a} is outside {subnet}")
            nics.append(Nic(net, _as_list(addrs)))
        client = bool(hv.get("lab_client", False))
        gateway = None
        if not client and "internal" in hv["lab_nics"] and "front" not in hv["lab_nics"]:
            gateway = hv.get("lab_default_gateway")
        host = Host(name, groups_of.get(name, []), nics, client, gateway)
        if not client and host.mgmt_address is None:
            raise TopologyError(f"{name}: a guest needs a mgmt address in lab_nics")
        topo.hosts[name] = host
    return topo
