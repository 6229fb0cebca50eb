"""Host tests of the key-server chain: root, Debian 12, packages from apt.

    apt-get install softhsm2 p11-kit p11-kit-modules stunnel4 libengine-pkcs11-openssl opensc nginx
    sudo .venv/bin/pytest tests/host -v -s     (-s prints the measured numbers)

Every test skips with the missing package named when the chain cannot be built.
"""
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kschain


@pytest.fixture(scope="module")
def chain():
    missing = kschain.missing_prerequisites()
    if missing:
        pytest.skip("key-server chain prerequisites missing: " + "; ".join(missing))
    c = kschain.Chain(tempfile.mkdtemp(prefix="openclb-ks-"))
    try:
        c.setup()
        c.start_watchdog()
        yield c
    finally:
        c.teardown()
        if os.environ.get("OPENCLB_KEEP_CHAIN"):
            print(f"\nkey-server chain kept in {c.dir} (OPENCLB_KEEP_CHAIN)")
        else:
            shutil.rmtree(c.dir, ignore_errors=True)
