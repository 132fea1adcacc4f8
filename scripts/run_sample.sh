#!/usr/bin/env bash
# Prepare the environment (scripts/ensure_env.sh) and run tools/run_sample.py from the
# repository root; arguments go to it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
exec "$PY" tools/run_sample.py "$@"
