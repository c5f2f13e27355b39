#!/usr/bin/env bash
# `make demo`: the wsd demo in rwp mode.  On a kernel without RWP it boots the
# Linux 7.3 test VM (vmtest) and runs the demo there, saying so; `make
# demo-host` runs it on this kernel in whatever mode it supports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mode=$($PY -m wsd kernel-info --json | $PY -c 'import json,sys; print(json.load(sys.stdin)["tracking_mode"] or "")')
if [[ $mode == rwp ]]; then
    exec $PY -m wsd demo "$@"
fi
echo "make demo: this kernel ($(uname -r)) has no userfaultfd RWP (mode here: ${mode:-none})."
echo "make demo: running the demo inside the Linux 7.3 VM instead (make demo-host runs it here)."
echo "make demo: booting the VM takes a few minutes without KVM; the guest is smaller there."
exec $PY -m vmtest run -- "$PY" -m wsd demo --size 64M "$@"
