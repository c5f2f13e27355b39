#!/usr/bin/env bash
# `make test`: every tier runs even if an earlier one failed, so one run shows
# the whole picture; the exit status is non-zero if any tier failed.
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf reports && mkdir -p reports
declare -A rc
for tier in lint unit integration kernel; do
    echo "=== $tier ==="
    case $tier in
        lint) make --no-print-directory lint ;;
        *) make --no-print-directory "test-$tier" ;;
    esac
    rc[$tier]=$?
done
.venv/bin/python tools/test_summary.py reports/unit.xml reports/integration.xml reports/kernel.xml
status=$?
for tier in lint unit integration kernel; do
    if [[ ${rc[$tier]} -ne 0 ]]; then
        echo "make test: tier '$tier' failed (exit ${rc[$tier]})"
        status=1
    fi
done
exit $status
