import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROLE = os.path.join(HERE, "..", "..", "..", "roles", "l7")
sys.path.insert(0, HERE)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def plan_mod():
    return _load("openclb_l7", os.path.join(ROLE, "filter_plugins", "openclb_l7.py"))


@pytest.fixture(scope="session")
def healthd():
    return _load("openclb_healthd", os.path.join(ROLE, "files", "openclb-healthd.py"))


@pytest.fixture(scope="session")
def vips_mod():
    return _load("openclb_l7_vips", os.path.join(ROLE, "files", "openclb-l7-vips.py"))
