# shellcheck shell=bash
# Choose RegionSpot's Python environment, install what it needs, and export PY (its python).
#
#   source scripts/ensure_env.sh     (what scripts/run_tests.sh and run_sample.sh do)
#   bash scripts/ensure_env.sh       (just install)
#
# An active environment wins: $VIRTUAL_ENV, else $CONDA_PREFIX. Without one, .venv/ at the repo
# root is created (with $REGIONSPOT_BASE_PYTHON, default python3) and used. The installer,
# scripts/install_deps.py, is quick when nothing changed ("environment up to date").
# Sourcing it changes the current directory to the repository root.

_regionspot_ensure_env() {
    local root venv_python
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    cd "$root" || return 1

    if [[ -n "${VIRTUAL_ENV:-}" ]]; then
        PY="$VIRTUAL_ENV/bin/python"
        echo "[ensure_env] using the active virtualenv $VIRTUAL_ENV"
    elif [[ -n "${CONDA_PREFIX:-}" ]]; then
        PY="$CONDA_PREFIX/bin/python"
        echo "[ensure_env] using the active conda environment $CONDA_PREFIX"
    else
        venv_python="$root/.venv/bin/python"
        if [[ ! -x "$venv_python" ]]; then
            echo "[ensure_env] creating $root/.venv with ${REGIONSPOT_BASE_PYTHON:-python3}"
            "${REGIONSPOT_BASE_PYTHON:-python3}" -m venv "$root/.venv" || {
                echo "[ensure_env] FAILED: could not create $root/.venv" >&2
                return 1
            }
        fi
        PY="$venv_python"
        echo "[ensure_env] using $root/.venv"
    fi
    if [[ ! -x "$PY" ]]; then
        echo "[ensure_env] FAILED: no python at $PY" >&2
        return 1
    fi
    export PY
    "$PY" "$root/scripts/install_deps.py"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    _regionspot_ensure_env
    exit $?
fi
_regionspot_ensure_env || return $?
