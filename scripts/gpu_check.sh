#!/usr/bin/env bash
# Everything that needs a GPU, in one command, from the repository root of a GPU host:
#   (a) environment  (b) build the extension in place  (c) tests/: the CUDA C++ kernels (forced with
#   backend="cuda", marker cuda_cxx), then every other GPU test (marker cuda: Triton, the default, reference)
#   (d) benchmark reports: benchmarks.report (the map-path ops) and benchmarks.serving (the q/k path,
#   ragged batches and LLaVA end to end)
#   (e) compute-sanitizer memcheck + racecheck on scripts/sanitizer/case_*.py  (f) summary.
#
#   scripts/gpu_check.sh OUTDIR [--quick] [--skip STEP[,STEP...]] [--dry-run]
#
# Steps: env, build, cxx, tests, bench, serving, memcheck, racecheck. Each step runs under `timeout`, logs
# into OUTDIR/gpu_check.log and goes on past failures; a step's timeout is cut so that none runs past
# GPU_CHECK_BUDGET_S seconds from the start (default 470: the whole run stays under 8 minutes).
# OUTDIR receives nine files: gpu_check.log, summary.txt, junit_cuda_cxx.xml, junit.xml, report.md,
# report.json, latency.png, serving.md, serving.json. summary.txt's "cuda-cxx:" line says whether the
# CUDA C++ kernels matched the reference on every GPU test: the evidence README "Backends" asks for
# before they become the default on CUDA tensors. Exit status 1 if a step failed or timed out.
#   PYTHON              interpreter (default python3)
#   GPU_CHECK_BUDGET_S  seconds for the whole run (default 470)
#   --quick             bench --quick;  --skip build,bench  skips steps;  --dry-run logs the steps only
set -u -o pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
[ $# -ge 1 ] || usage
OUTDIR=$1; shift
QUICK=""; SKIP=","; DRY=0
while [ $# -gt 0 ]; do
    case $1 in
        --quick) QUICK="--quick" ;;
        --skip) SKIP=",$2,"; shift ;;
        --dry-run) DRY=1 ;;
        *) usage ;;
    esac
    shift
done
[ -f setup.py ] && [ -d fopru_kernels ] && [ -d benchmarks ] || { echo "run from the repository root" >&2; exit 2; }

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
SUMMARY=$OUTDIR/summary.txt
: >"$LOG"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
export PYTHONUNBUFFERED=1
RESULTS=()

# step NAME LIMIT_S COMMAND: runs COMMAND (a bash string) under timeout, appends its output to the
# log, records PASS / FAIL / TIMEOUT / SKIP. On failure the end of its output goes to stdout too.
step() {
    local name=$1 limit=$2 cmd=$3 left status rc start offset
    left=$((BUDGET - SECONDS))
    if [[ $SKIP == *",$name,"* ]]; then
        RESULTS+=("$name|SKIP|0|--skip $name"); echo "[$name] SKIP (--skip)"; return
    fi
    if [ "$left" -lt 15 ]; then
        RESULTS+=("$name|SKIP|0|out of the ${BUDGET}s budget"); echo "[$name] SKIP (budget spent)"; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    printf '\n===== [%s] %s  timeout %ss\n$ %s\n' "$name" "$(date -u +%FT%TZ)" "$limit" "$cmd" >>"$LOG"
    echo "[$name] running (timeout ${limit}s)"
    if [ "$DRY" = 1 ]; then
        RESULTS+=("$name|DRY|0|not run (--dry-run)"); return
    fi
    offset=$(($(stat -c %s "$LOG") + 1))
    start=$SECONDS
    timeout --kill-after=15 "$limit" bash -c "$cmd" >>"$LOG" 2>&1
    rc=$?
    case $rc in
        0) status=PASS ;;
        124 | 137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    printf '\n----- [%s] %s rc=%s %ss\n' "$name" "$status" "$rc" "$((SECONDS - start))" >>"$LOG"
    RESULTS+=("$name|$status|$((SECONDS - start))|rc=$rc")
    echo "[$name] $status after $((SECONDS - start))s"
    if [ $status != PASS ]; then
        tail -c +"$offset" "$LOG" | tail -n 25 | sed "s/^/  [$name] /"
    fi
}

# (a) environment
step env 30 "rc=0; nvidia-smi || rc=1
$PY -c 'import sys, torch
print(sys.version)
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)
try:
    import triton; print(\"triton\", triton.__version__)
except ImportError as e:
    print(\"triton missing:\", e)
assert torch.cuda.is_available(), \"torch sees no GPU\"
print(\"gpu\", torch.cuda.get_device_name())' || rc=1
nvcc --version | tail -n 2 || rc=1
command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer
exit \$rc"

# (b) build against this torch; torch's headers want cusparse.h & co, which the toolkit may lack:
# take them from the nvidia wheels torch depends on.
NVINC=$($PY - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = [*site.getsitepackages(), *sys.path]
dirs = [d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "cu[0-9]*", "include"))]
dirs = dirs or [d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "include"))]
print(":".join(dict.fromkeys(os.path.realpath(d) for d in dirs if os.path.isdir(d))))
EOF
)
[ -n "$NVINC" ] && export CPATH=$NVINC${CPATH:+:$CPATH}
echo "CPATH=${CPATH:-}" >>"$LOG"
step build 180 "FOPRU_BUILD_CUDA=1 FOPRU_CUDA_ARCHS=90 MAX_JOBS=16 $PY setup.py build_ext --inplace && \
$PY -c 'import fopru_kernels as F; print(\"library:\", F.HAS_LIBRARY, \"cuda kernels:\", F.HAS_CUDA_KERNELS, \"backends:\", F.available_backends(\"cuda\"), \"default on cuda:\", F.default_backend(\"cuda\")); assert F.HAS_CUDA_KERNELS, \"built without the CUDA kernels\"'"

# (c) the GPU tests (the CPU suite runs in CI; here only what needs the GPU, to fit the lease), in two
# steps: the CUDA C++ kernels alone first (their result is the summary's cuda-cxx line), then the rest.
# The test files hold each op's CPU and GPU tests side by side: the markers pick the GPU ones (`cuda`;
# `cuda_cxx` for the CUDA C++ kernels, every one of which is also marked `cuda`).
PYTEST_OPTS=""
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTS="--timeout=120"
# Several workers on the one GPU: the grid's cases are independent and mostly compile or wait.
$PY -c "import xdist" 2>/dev/null && PYTEST_OPTS="$PYTEST_OPTS -n 8"
GPU_TESTS="tests/test_prune_tokens.py tests/test_select.py tests/test_qk.py tests/test_varlen.py tests/test_focal.py tests/test_qk_varlen.py tests/test_errors.py tests/test_backends.py"
step cxx 60 "$PY -m pytest $GPU_TESTS -v -p no:cacheprovider -m 'cuda_cxx and not slow' --maxfail=10 -rfE $PYTEST_OPTS --junitxml='$OUTDIR/junit_cuda_cxx.xml'"
step tests 110 "$PY -m pytest $GPU_TESTS -v -p no:cacheprovider -m 'cuda and not cuda_cxx and not slow' --maxfail=10 -rfE $PYTEST_OPTS --junitxml='$OUTDIR/junit.xml'"

# (d) benchmark reports: report.md, report.json, latency.png; serving.md, serving.json. Their rows name
# the backend; FOPRU_BACKEND=cuda keeps the CUDA C++ kernels in the dispatcher's CUDA slot so that the
# "cuda" rows time them without the Python hop a replaced slot adds (the "triton" rows call Triton
# directly either way; the LLaVA end-to-end row runs the slot, labelled by its kernel origin).
step bench 100 "FOPRU_BACKEND=cuda $PY -m benchmarks.report --out '$OUTDIR' $QUICK"
step serving 100 "FOPRU_BACKEND=cuda $PY -m benchmarks.serving --out '$OUTDIR' $QUICK"

# (e) compute-sanitizer; no caching allocator, so an out-of-bounds access inside a cached block is seen
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
CASES=$(ls scripts/sanitizer/case_*.py 2>/dev/null | tr '\n' ' ')
for tool in memcheck racecheck; do
    if [ -z "$CASES" ]; then
        RESULTS+=("$tool|SKIP|0|scripts/sanitizer/case_*.py missing"); echo "[$tool] SKIP (no scripts/sanitizer/case_*.py)"; continue
    fi
    if [ ! -x "$SANITIZER" ] && [ "$DRY" = 0 ]; then  # a dry run still logs the command
        RESULTS+=("$tool|SKIP|0|compute-sanitizer not found"); echo "[$tool] SKIP (no compute-sanitizer)"; continue
    fi
    # The cases force backend="cuda"; FOPRU_BACKEND=cuda runs those calls straight through the dispatcher.
    step $tool 50 "rc=0; for c in $CASES; do FOPRU_BACKEND=cuda PYTORCH_NO_CUDA_MEMORY_CACHING=1 $SANITIZER --tool $tool --error-exitcode 1 $PY \$c || rc=1; done; exit \$rc"
done

# pytest's count line of a step ("12 passed, 3 skipped in 40.1s"), from the log
pytest_counts() {
    sed -n "/^===== \[$1\]/,/^----- \[$1\]/p" "$LOG" | grep -E '(passed|failed|error|skipped).* in [0-9.]+s' | tail -n 1 |
        tr -d '=' | sed 's/^ *//; s/ *$//'
}

# The one line that decides whether the CUDA C++ kernels may become the default (README "Backends"):
# step cxx passed and ran at least one test, so no forced-CUDA-C++ test failed, errored or timed out.
cuda_cxx_line() {
    local status="not run" r name st counts
    for r in "${RESULTS[@]}"; do
        IFS='|' read -r name st _ _ <<<"$r"
        [ "$name" = cxx ] && status=$st
    done
    counts=$(pytest_counts cxx)
    if [ "$status" = PASS ] && [[ $counts =~ [1-9][0-9]*\ passed ]]; then
        echo "cuda-cxx: MATCHED: the CUDA C++ kernels matched the reference on every GPU test (${counts}); README \"Backends\": flip the default where they are faster"
    else
        echo "cuda-cxx: NOT VERIFIED: step cxx $status (${counts:-no pytest summary}); Triton stays the default on CUDA tensors"
    fi
}

# (f) summary
{
    echo "gpu_check $(date -u +%FT%TZ), ${SECONDS}s in all (budget ${BUDGET}s), out: $OUTDIR"
    printf '%-10s %-8s %6s  %s\n' step status secs note
    for r in "${RESULTS[@]}"; do
        IFS='|' read -r name status secs note <<<"$r"
        printf '%-10s %-8s %6s  %s\n' "$name" "$status" "$secs" "$note"
    done
    cuda_cxx_line
    tests_line=$(pytest_counts tests)
    [ -n "$tests_line" ] && echo "tests: $tests_line"
    if [ -f "$OUTDIR/report.md" ]; then
        sed -n '/^## Targets/,/^## Results/p' "$OUTDIR/report.md" | grep '^| [a-z]' | grep -v '^| backend'
    fi
    [ -f "$OUTDIR/serving.md" ] && grep -E '\| (met|\*\*not met\*\*) \|' "$OUTDIR/serving.md"
} >"$SUMMARY"
printf '\n===== summary\n' >>"$LOG"
cat "$SUMMARY" >>"$LOG"
echo
cat "$SUMMARY"
grep -qE '^[a-z]+ +(FAIL|TIMEOUT) ' "$SUMMARY" && exit 1
exit 0
