#!/usr/bin/env bash
# Run ansible-test (sanity, units) on the collection openclb.lb.
# ansible-test must run from inside ansible_collections/<ns>/<name>/ and
# refuses a symlinked path, so the working tree (tracked and new files) is
# copied into a temporary collection tree first.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-sanity}; shift || true
tree=$(mktemp -d /tmp/openclb-ansible-test.XXXXXX)
trap 'rm -rf "$tree"' EXIT
dest=$tree/ansible_collections/openclb/lb
mkdir -p "$dest"
# What the collection ships (galaxy.yml build_ignore): the lab, the lab and
# host tests, the benchmarks and Molecule scenarios are project tooling,
# linted by ruff/yamllint/ansible-lint (make lint), not collection content.
(cd "$here" && git ls-files -co --exclude-standard \
   | grep -Ev '^(lab|benchmarks|molecule|tests/lab|tests/host)/' \
   | tar -cf - -T - | tar -xf - -C "$dest")

# ansible-test bootstraps pip in its venvs with get-pip.py from a server we
# cannot reach: give it the stand-in that uses ensurepip + PyPI instead.
pip_version=$(grep -oP "pip='\K[0-9.]+" "$here"/.venv/lib/python3*/site-packages/ansible_test/_internal/python_requirements.py | head -1 | tr . _)
mkdir -p ~/.ansible/test/cache
cp "$here/tests/sanity/get_pip_standin.py" ~/.ansible/test/cache/get_pip_${pip_version}.py

cd "$dest"
export PATH="$here/.venv/bin:$PATH"
case "$what" in
  sanity)
    # Skipped: tests that need a container runtime or other Python versions,
    # and the changelog test (no changelog fragments kept yet).
    ansible-test sanity --python 3.11 --color no --requirements \
      --skip-test changelog "$@" ;;
  units)
    ansible-test units --python 3.11 --color no --requirements "$@" ;;
  *) echo "usage: $0 sanity|units [ansible-test args]" >&2; exit 2 ;;
esac
