#!/usr/bin/env bash
# Idempotent setup for a fresh machine: Debian packages wsd's tests need, then
# the project's virtualenv. A second run only checks and returns.
#
#   tools/bootstrap.sh            apt packages + .venv
#   WSD_SKIP_APT=1 tools/...      venv only (no root needed)
set -euo pipefail
cd "$(dirname "$0")/.."

# qemu/busybox/kmod/udev: the Linux 7.3 test VM (see vmtest/); qemu and
# busybox also boot the guest wsd attach adopts in its end-to-end test.
# redis-server: the storage integration tests start a private one.  gcc: the
# ABI test compiles the uapi headers to check wsd's cffi layouts; the attach
# tests compile a stand-in VMM and the C hand-off example (contrib/).
# libxxhash-dev, libssl-dev: xxhash.h and libxxhash, OpenSSL's headers and libcrypto,
# for the per-page hashing and AES-GCM in C (wsd/_batch.c).
APT_PACKAGES=(qemu-system-x86 busybox-static kmod udev redis-server gcc libxxhash-dev libssl-dev)

missing=()
if [[ -z "${WSD_SKIP_APT:-}" ]]; then
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
    done
fi
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "bootstrap: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    echo "bootstrap: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# Reinstall only when the dependency list or the C extension changed (the
# install builds wsd._pages_native, wsd._batch and wsd.kernel._uapi in place, see setup.py),
# or when one of those built files is gone (a git clean that kept .venv).
want=$(cat pyproject.toml setup.py wsd/_pages_build.py wsd/kernel/_uapi_build.py wsd/_batch.c | sha256sum | cut -d' ' -f1)
have=$(cat .venv/.wsd-deps 2>/dev/null || true)
built=yes
compgen -G 'wsd/_pages_native*.so' >/dev/null || built=
compgen -G 'wsd/_batch*.so' >/dev/null || built=
[[ -f wsd/kernel/_uapi.py ]] || built=
if [[ "$want" != "$have" || -z "$built" ]]; then
    echo "bootstrap: installing Python packages into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    echo "$want" > .venv/.wsd-deps
fi
