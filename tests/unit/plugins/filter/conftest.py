"""Import path for the collection: the repository root is openclb.lb; link it
as ansible_collections/openclb/lb in a temporary directory on sys.path unless
that already resolves (ansible-test units, or tests/unit/conftest.py)."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), *[".."] * 4))


def _collection_root():
    try:
        spec = importlib.util.find_spec("ansible_collections.openclb.lb")
    except ModuleNotFoundError:
        spec = None
    if spec is not None:
        return os.path.dirname(os.path.dirname(os.path.dirname(list(spec.submodule_search_locations)[0])))
    tmp = tempfile.mkdtemp(prefix="openclb-units-")
    atexit.register(shutil.rmtree, tmp, True)
    os.makedirs(os.path.join(tmp, "ansible_collections", "openclb"))
    os.symlink(ROOT, os.path.join(tmp, "ansible_collections", "openclb", "lb"))
    sys.path.insert(0, tmp)
    return tmp


COLLECTIONS_PATH = _collection_root()


@pytest.fixture
def collections_path():
    """A directory holding ansible_collections/openclb/lb, for ansible-playbook runs."""
    return COLLECTIONS_PATH
