#!/usr/bin/env bash
# Build the offline wheel bundle for a bare GPU machine (CPython 3.12, manylinux x86_64) into
# wheels/ (git-ignored), then check it with a Python 3.12 when one is found:
#
#   bash tools/gpu/make_wheelhouse.sh            # needs the package registry; a few minutes
#   REGIONSPOT_PY312=/path/to/python3.12 bash tools/gpu/make_wheelhouse.sh
#   WHEELHOUSE=/elsewhere bash tools/gpu/make_wheelhouse.sh
#
# What goes in, and why: tools/gpu/wheelhouse.py (its docstring). The GPU check
# (tools/gpu/check.sh) installs the bundle with `pip install --no-index --no-deps --target`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${PY:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}"
PY="${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
OUT="${WHEELHOUSE:-wheels}"
"$PY" tools/gpu/wheelhouse.py build --out "$OUT" "$@"
# A Python 3.12 that runs (a pyenv shim without that version selected does not).
PY312=""
for candidate in "${REGIONSPOT_PY312:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python; do
    if [[ -n "$candidate" ]] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
        PY312="$candidate"
        break
    fi
done
if [[ -n "$PY312" ]]; then
    "$PY" tools/gpu/wheelhouse.py verify --out "$OUT" --python "$PY312"
else
    echo "[wheelhouse] no Python 3.12 found (set REGIONSPOT_PY312): the offline install was not checked" >&2
fi
