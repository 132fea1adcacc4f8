#!/usr/bin/env bash
# The one-shot GPU check (issue 16): one command that, on a bare GPU machine, installs the wheel
# bundle, verifies every import, runs the CUDA tests and every benchmark, and leaves one JSON and
# one log. Under 9 minutes on one H100 (the sum of the stage limits below is 530 s).
#
#   bash tools/gpu/check.sh              # on the GPU machine (wheels/ built by make_wheelhouse.sh)
#   bash tools/gpu/check.sh --dry-run    # here, on the CPU: tiny models, a handful of images (CI)
#
# Environment:
#   REGIONSPOT_GPU_OUT   where everything goes (default output/gpu_check, or output/gpu_check_dry_run)
#   REGIONSPOT_GPU_SITE  where the bundle is installed (default /tmp/regionspot-gpu-site)
#   PY                   the Python to use (default: python3)
#   WHEELHOUSE           the wheel folder (default wheels/)
#
# Stages, each under its own `timeout` so that a hang in one still leaves the others' figures:
#   install   pip install --no-index --no-deps --target $REGIONSPOT_GPU_SITE wheels/*.whl
#             (--dry-run: skipped when everything already imports, which the log says)
#   imports   every module of the bundle and of regionspot, with torch; GPU and versions -> env.json
#             (a failure here stops the check: nothing else could run)
#   cuda      python -m pytest -m cuda tests (tests/test_cuda.py) -> cuda_tests.xml, cuda_figures.json;
#             fails unless torch sees the GPU and every CUDA test ran (counted from the XML);
#             --dry-run says that it ran none
#   e2e_bb    tools/benchmark.py e2e, BB: plain vs fast, float32/bfloat16/float16 -> e2e_bb.json
#   e2e_bl    the same for BL, and the largest batch that fits (--find-max-batch) -> e2e_bl.json
#   train     tools/benchmark.py train, BL, with and without the token cache, bfloat16 AMP -> train.json
#   eval      tools/benchmark.py eval, the LVIS-val-sized evaluator timing (fast backend) -> eval.json
# Then gpu_check.json (every stage's status, time and figures) and check.log in the output folder.
# Exit status: 0 when every stage passed, 1 otherwise. Figures go to docs/speed.md ("GPU check").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
REPO="$PWD"

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "check.sh: error: unknown argument $arg (known: --dry-run)" >&2; exit 2 ;;
    esac
done

if [[ $DRY_RUN -eq 1 ]]; then default_out=output/gpu_check_dry_run; else default_out=output/gpu_check; fi
OUT="${REGIONSPOT_GPU_OUT:-$default_out}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
export REGIONSPOT_GPU_OUT="$OUT"
SITE="${REGIONSPOT_GPU_SITE:-/tmp/regionspot-gpu-site}"
WHEELS="${WHEELHOUSE:-$REPO/wheels}"
PY="${PY:-python3}"
LOG="$OUT/check.log"
: > "$LOG"
: > "$OUT/stages.tsv"
rm -f "$OUT"/{env,e2e_bb,e2e_bl,train,eval,cuda_figures,cuda_stage,gpu_check}.json

log() { echo "[check] $*" | tee -a "$LOG"; }

# stage NAME LIMIT_S COMMAND...: run it under `timeout`, its output into the log (and the
# console), its exit status and seconds into stages.tsv.
stage() {
    local name="$1" limit="$2" start rc
    shift 2
    log "stage $name (limit ${limit} s): $*"
    start=$(date +%s%N)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    local seconds="$((ms / 1000)).$(( (ms % 1000) / 100 ))"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >> "$OUT/stages.tsv"
    if [[ $rc -eq 0 ]]; then log "stage $name: ok (${seconds%.*} s)";
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then log "stage $name: TIMED OUT after $limit s";
    else log "stage $name: FAILED (exit $rc)"; fi
    return "$rc"
}

log "RegionSpot GPU check $( [[ $DRY_RUN -eq 1 ]] && echo '(dry run: CPU, tiny models)' ) at $(date -Is)"
log "output: $OUT; python: $(command -v "$PY") ($("$PY" --version 2>&1))"
log "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee -a "$LOG"

# ----------------------------------------------------------------------------- install
export PYTHONPATH="$REPO/projects/RegionSpot:$REPO${PYTHONPATH:+:$PYTHONPATH}"
IMPORT_PROBE='import torch, detectron2.data, segment_anything, clip, open_clip, lvis, faster_coco_eval, regionspot'
if [[ $DRY_RUN -eq 1 ]] && "$PY" -c "$IMPORT_PROBE" >/dev/null 2>&1; then
    log "install: skipped (dry run): the packages already import in $PY; the bundle itself is checked by" \
        "tools/gpu/wheelhouse.py verify"
elif ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    stage install 30 "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check \
        --quiet --target "$SITE" --upgrade "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
else
    log "install: FAILED: no wheels in $WHEELS (build them with tools/gpu/make_wheelhouse.sh where the registry" \
        "is reachable, and carry wheels/ to this machine)"
    printf 'install\t1\t0\t30\n' >> "$OUT/stages.tsv"
    "$PY" tools/gpu/check_report.py summary --out "$OUT" $( [[ $DRY_RUN -eq 1 ]] && echo --dry-run ) | tee -a "$LOG"
    exit 1
fi

# ----------------------------------------------------------------------------- imports
if ! stage imports 30 "$PY" tools/gpu/check_report.py imports --wheels "$WHEELS" --out "$OUT/env.json"; then
    log "the imports failed: nothing else runs"
    "$PY" tools/gpu/check_report.py summary --out "$OUT" $( [[ $DRY_RUN -eq 1 ]] && echo --dry-run ) | tee -a "$LOG"
    exit 1
fi

# ----------------------------------------------------------------------------- the rest
export DETECTRON2_DATASETS="$OUT/datasets"
if [[ $DRY_RUN -eq 1 ]]; then
    DEVICE=cpu
    E2E_BB=(--models small --quick --threads 1 --workers 1 --runs plain,fast_bf16 --no-compile)
    E2E_BL=(--models small --quick --threads 1 --workers 1 --runs plain,fast --no-compile --find-max-batch)
    TRAIN=(--quick --threads 1)
    EVAL=(--quick --skip-reference)
else
    DEVICE=cuda
    # 256 images of the synthetic LVIS-val-like workload, 10 boxes each, batch 32 (the fast runs),
    # without torch.compile (its compilation alone would take a stage's budget).
    E2E_BB=(--models bb --images 256 --batch-size 32 --workers 8 --runs plain,fast,fast_bf16,fast_fp16 --no-compile)
    E2E_BL=(--models bl --images 256 --batch-size 32 --workers 8 --runs plain,fast,fast_bf16,fast_fp16 --no-compile
            --find-max-batch --max-batch 128)
    TRAIN=(--models bl --modes online,cached --batch 16 --precision bfloat16 --iters 20 --warmup 5)
    EVAL=(--skip-reference)
fi

stage cuda 220 "$PY" tools/gpu/check_report.py cuda --out "$OUT" $( [[ $DRY_RUN -eq 1 ]] && echo --dry-run )
stage e2e_bb 70 "$PY" tools/benchmark.py e2e --device "$DEVICE" "${E2E_BB[@]}" --quiet \
    --data-dir "$OUT/e2e_data" --output "$OUT/e2e_bb.json"
stage e2e_bl 90 "$PY" tools/benchmark.py e2e --device "$DEVICE" "${E2E_BL[@]}" --quiet \
    --data-dir "$OUT/e2e_data" --output "$OUT/e2e_bl.json"
stage train 50 "$PY" tools/benchmark.py train --device "$DEVICE" "${TRAIN[@]}" --output "$OUT/train.json"
stage eval 40 "$PY" tools/benchmark.py eval "${EVAL[@]}" --output "$OUT/eval.json"

"$PY" tools/gpu/check_report.py summary --out "$OUT" $( [[ $DRY_RUN -eq 1 ]] && echo --dry-run ) | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
