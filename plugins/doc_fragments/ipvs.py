# Copyright: openclb contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What every IPVS module of openclb.lb needs on the managed node."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
requirements:
  - pyroute2 >= 0.9.7 on the managed node (Debian 12's python3-pyroute2 0.7.2 has no IPVS support; the
    C(node_python) role installs it in a virtualenv used as the interpreter for these modules)
  - Linux with IPVS (the C(ip_vs) kernel module and its scheduler modules)
attributes:
  platform:
    platforms: linux
"""
