#!/usr/bin/env bash
# The project's GPU check in one run: the GPU tests, both op benchmarks (float32
# and float16, batch 8 and 32), the per-kernel profile and the train-step benchmark, all output into
# one results file. Sized for under 8 minutes on one H100/H200: every step has its own time limit and
# the suite stops starting steps when its budget (SUITE_BUDGET_S, default 460 s) runs out.
# Both kernel variants run in the same steps (ops.kernel_loader: "simple", the default and the kernels
# verified on a GPU, and "fast"): the GPU tests compare fast == simple == reference, and the op benchmarks
# and the profile time each variant, so one run shows whether the fast kernels are right and how much
# faster (the train-step benchmark runs the default variant; VMM_KERNELS=fast for the other). Steps run in order of importance: correctness first (the GPU tests, then compute-sanitizer's
# racecheck / synccheck / memcheck / initcheck over every kernel path when the tool is installed, and a
# mutation check that a removed barrier is caught).
#
#   bash benchmarks/gpu_suite.sh [RESULTS_FILE]
#
# RESULTS_FILE defaults to runs/gpu_suite/results-<UTC time>.txt (runs/ is ignored by git); the
# train-step JSON goes next to it. Runs from a checkout: the repository root is put on PYTHONPATH,
# nothing is installed. Python: $PYTHON, else `python` when it imports torch, else .venv/bin/python.
#
# Every step runs even when an earlier one failed; the exit status is 0 only when every step passed
# (a step that could not run, a timeout, a GPU test run in which no test ran, or a step skipped for
# lack of time all count as failures). Without a GPU every step fails quickly and says why.
set -u -o pipefail

start_dir=$(pwd)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif command -v python >/dev/null 2>&1 && python -c "import torch" >/dev/null 2>&1; then
    py=python
elif [ -x "$root/.venv/bin/python" ]; then
    py="$root/.venv/bin/python"
else
    echo "gpu_suite: no Python with torch found (set PYTHON)" >&2
    exit 2
fi

results=${1:-runs/gpu_suite/results-$(date -u +%Y%m%dT%H%M%SZ).txt}
case $results in /*) ;; *) results="$start_dir/$results" ;; esac
mkdir -p "$(dirname "$results")" || exit 2
: >"$results" || exit 2
step_json="${results%.txt}-bench_step.json"

budget=${SUITE_BUDGET_S:-460}
suite_start=$SECONDS
summary=()
failures=0

log() { echo "$*" | tee -a "$results"; }

# run_step NAME LIMIT_S CHECK CMD...: runs CMD (output into the results file) under min(LIMIT_S, the
# time left); CHECK "pytest" additionally fails a pytest run in which no test passed.
run_step() {
    local name=$1 limit=$2 check=$3
    shift 3
    local left=$((budget - (SECONDS - suite_start)))
    if [ "$left" -lt 30 ]; then
        summary+=("SKIP  $name (suite budget of ${budget} s used up)")
        failures=$((failures + 1))
        log "== $name: SKIPPED, suite budget used up"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log ""
    log "== $name (limit ${limit} s): $*"
    local t0=$SECONDS out rc
    out=$(mktemp)
    timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1
    rc=$?
    cat "$out" >>"$results"
    local status="PASS"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="FAIL (time limit of ${limit} s)"
    elif [ "$rc" -ne 0 ]; then
        status="FAIL (exit $rc: $(grep -v '^\s*$' "$out" | tail -n 1 | cut -c1-150))"
    elif [ "$check" = pytest ] && ! tail -n 3 "$out" | grep -q " passed"; then
        status="FAIL (no GPU test ran: $(tail -n 1 "$out" | cut -c1-120))"
    fi
    rm -f "$out"
    [ "$status" = PASS ] || failures=$((failures + 1))
    local word=${status%% *}
    summary+=("$(printf '%-5s %s (%d s)%s' "$word" "$name" $((SECONDS - t0)) "${status#"$word"}")")
    log "== $name: $status, $((SECONDS - t0)) s"
}

log "gpu_suite $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (uncommitted changes)'), python $py"

run_step "environment" 60 - "$py" -c '
import sys, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda)
try:
    import cupy
    print("cupy", cupy.__version__)
except Exception as exc:
    print("cupy: not importable:", exc)
if not torch.cuda.is_available():
    sys.exit("no CUDA device: the GPU steps below cannot run")
p = torch.cuda.get_device_properties(0)
print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "x", torch.cuda.device_count())
'
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >>"$results" 2>&1

run_step "GPU tests (pytest -m gpu)" 240 pytest "$py" -m pytest -m gpu -q -rs -p no:cacheprovider tests

# What CuPy builds here: NVRTC's version, the architecture chosen for this GPU, and each kernel's registers and
# local memory per thread (spills show as local memory), for both variants and the float dtypes.
run_step "kernel builds (NVRTC, architecture, registers, local memory)" 60 - "$py" -c '
import torch, ops
from ops.kernel_loader import compiled_kernel_report, use_kernel_variant
from benchmarks.sanitize_kernels import flow_cases, sifa_cases
dev = torch.device("cuda")
for variant in ("simple", "fast"):
    with use_kernel_variant(variant):
        for _ in sifa_cases(dev, "cupy"):
            pass
        for _ in flow_cases(dev, "cupy"):
            pass
torch.cuda.synchronize()
for r in compiled_kernel_report():
    print("{source:14s} {kernel:34s} {dtype:13s} sm_{arch} nvrtc {nvrtc} regs {num_regs:3d} local {local_size_bytes:4d} B "
          "shared {shared_size_bytes:5d} B max threads {max_threads_per_block}".format(**r))
'


for dtype in float32 float16; do
    run_step "bench_sifa $dtype, N 8 and 32, fast and simple kernels" 75 - \
        bash -c 'cd benchmarks && exec "$0" bench_sifa.py --gpu-only --require-cuda --dtype "$1" --clips 8 32' "$py" "$dtype"
done

for dtype in float32 float16; do
    for clips in 8 32; do
        # The full-size networks' shapes (28² and 14², T = 16, n_iter 10 and 20); fewer rounds at batch 32.
        iters=10
        [ "$clips" -eq 32 ] && iters=5
        run_step "bench_flow $dtype, N $clips, fast and simple kernels" 75 - \
            bash -c 'cd benchmarks && exec "$0" bench_flow.py --gpu-only --require-cuda --dtype "$1" --clips "$2" \
                --iters "$3" --warmup 2 --frames 16 --sizes 28 14 --n-iter 10 20' "$py" "$dtype" "$clips" "$iters"
    done
done

# compute-sanitizer over every kernel path on tiny shapes (benchmarks/sanitize_kernels.py): shared-memory
# races, barrier / warp-mask misuse and out-of-bounds accesses — what host emulation cannot prove. Runs
# when the tool is installed (SANITIZE=0 skips it); its absence is reported, not counted as a failure.
sanitizer=$(command -v compute-sanitizer || true)
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
if [ "${SANITIZE:-1}" = 0 ]; then
    log "== compute-sanitizer steps skipped (SANITIZE=0)"
elif [ -z "$sanitizer" ]; then
    log "== compute-sanitizer not found: the kernels' race / sync / memory checks did not run"
    summary+=("NOTE  compute-sanitizer not found: kernel race / sync / memory checks not run")
else
    for tool in racecheck synccheck memcheck initcheck; do
        run_step "compute-sanitizer $tool (sanitize_kernels.py)" 60 - \
            env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
            "$py" benchmarks/sanitize_kernels.py
    done
fi

# racecheck sees shared memory only: the comparison with the simple kernels is what catches a barrier that
# orders anything else. Check that it does, here: one required barrier removed must give a mismatch.
run_step "mutation check: a removed barrier fails the comparison (mutation_check.py)" 60 - \
    "$py" benchmarks/mutation_check.py

run_step "per-kernel profile (profile_ops.py)" 75 - \
    bash -c 'cd benchmarks && exec "$0" profile_ops.py --dtypes float32 float16' "$py"

run_step "train step (bench_step.py)" 150 - \
    bash -c 'cd benchmarks && exec "$0" bench_step.py --device cuda --json "$1"' "$py" "$step_json"

# What SIFA's correlation branches (docs/sifa.md §5) cost per training step, in the configuration the
# step above finds fastest for SIFA-R50.
run_step "train step, SIFA-R50 with correlation branches (bench_step.py --pairs sifa-corr)" 60 - \
    bash -c 'cd benchmarks && exec "$0" bench_step.py --device cuda --pairs sifa-corr --precisions bf16-mixed \
        --memory-formats channels_last --json "$1"' "$py" "${step_json%.json}-corr.json"

log ""
log "== summary ($((SECONDS - suite_start)) s, budget ${budget} s; results in $results)"
for line in "${summary[@]}"; do
    log "$line"
done
if [ "$failures" -gt 0 ]; then
    log "$failures step(s) did not pass"
    exit 1
fi
log "all steps passed"
