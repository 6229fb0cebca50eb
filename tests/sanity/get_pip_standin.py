"""Stand-in for ansible-test's pip bootstrap script (get-pip.py).

ansible-test downloads get-pip.py from a CI file server that this project's
build machines cannot reach; PyPI they can. This does what get-pip does with
the interpreter's own ensurepip, then installs the requested pip from PyPI.
tests/ansible-test.sh puts it where ansible-test looks for its cached copy.
"""

import ensurepip
import os
import subprocess
import sys

# get-pip's own flags, which pip itself does not know
GET_PIP_ONLY = {"--no-setuptools", "--no-wheel"}
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"

if __name__ == "__main__":
    ensurepip.bootstrap(upgrade=True)
    args = [a for a in sys.argv[1:] if a not in GET_PIP_ONLY]
    # ansible-test runs pip with a cleaned environment: keep the machine's CA bundle
    # (a TLS-intercepting proxy's CA may only be there).
    if os.path.exists(SYSTEM_CA):
        args = ["--cert", SYSTEM_CA, *args]
    sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "--upgrade", *args]))
