#!/usr/bin/env bash
# Prepare the environment (scripts/ensure_env.sh) and run the test suite from the repository
# root. Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -k predictor -x`
# (paths are relative to the repository root).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
exec "$PY" -m pytest tests -q "$@"
