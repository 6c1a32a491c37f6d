#!/bin/sh
# Build the hastpy wheel that site.yml installs in the Vagrant VMs (hast_wheel), from this
# checkout, into .vagrant/wheels. Run by a Vagrant trigger before `up` and `provision`; the VMs
# fetch hastpy's dependencies from PyPI themselves.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
out="$top/.vagrant/wheels"
python=${PYTHON:-python3}

mkdir -p "$out"
rm -f "$out"/hastpy-*.whl
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$out" "$top"
ls "$out"/hastpy-*.whl
