#!/usr/bin/env bash
# GPU verification in one go, for a lent GPU machine (no network; torch with CUDA
# already installed): build the extension, run the CUDA tests, compute-sanitizer
# (memcheck + racecheck) on small shapes, the op benchmarks. Writes three files,
# $OUT/gpu_check.log (every step's output), $OUT/gpu_check.json (steps, every benchmark's rows,
# the end-to-end runs' results, the standalone CUDA programs' output) and $OUT/steps.tsv (OUT
# defaults to a temp dir; the lent machine returns at most 8 files, so each step's own files stay
# in a temp dir) and prints a short table last. Time: under 6 minutes on 16 cores (about 4.5 on
# an H200), plus up to 5 for the torch.compile comparison of the Churches UNet (never run on a GPU yet). The whole run
# keeps to GPU_CHECK_BUDGET_S (default 540 s, for a 10-minute lease): each step's limit is cut to
# the time left, a step with under 5 s left is "skipped", and 40 s stay for the summary (a run
# killed from outside would leave no JSON and no table). A step that ignores SIGTERM (a hung
# kernel) is killed 10 s after its limit. A failed step does not stop the others; the exit status
# is 0 only when every step is "ok".
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   bash benchmarks/gpu_check.sh ops        # re-check after an op kernel change: build, the
#                                           # op tests, op benchmarks and sanitizers (~2 min)
#   bash benchmarks/gpu_check.sh attention  # re-check after an attention kernel change: build,
#                                           # the op tests, attention benchmarks (SDPA and the
#                                           # forward's tile configurations; on a 9.x GPU first
#                                           # the wgmma forward and backward against the
#                                           # production kernels) and sanitizers (~3 min, ~5 min
#                                           # with the wgmma step)
#
# Other ops add their pieces to the arrays below (SMOKE: a command exercising
# the op once on small shapes, run under each sanitizer; BENCH: a benchmark
# command that takes --json PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$(mktemp -d /tmp/sgdm_gpu_check.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sgdm_gpu_check_work.XXXXXX")  # each step's JSON, text and binaries; gathered at the end
LOG=$OUT/gpu_check.log
STEPS=$OUT/steps.tsv
: >"$LOG"
: >"$STEPS"
PY=${PYTHON:-$(command -v python3 || echo python)}  # the lent machine's torch is under python3
export PYTHONUNBUFFERED=1  # a step cut short at its limit still leaves what it printed in the log
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}  # 9.0a: the Hopper wgmma kernels too
export MAX_JOBS=${MAX_JOBS:-16}
export SGDM_REQUIRE_KERNELS=1 HF_HUB_OFFLINE=1
export SGDM_CPU_AVX512=${SGDM_CPU_AVX512:-0}  # CPU paths are checked elsewhere; a faster build
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}

BUDGET=${GPU_CHECK_BUDGET_S:-540}
case $BUDGET in '' | *[!0-9]*) echo "GPU_CHECK_BUDGET_S=$BUDGET: expected whole seconds" >&2; exit 2 ;; esac
RESERVE=30   # the summary at the end (one python, torch imported once)
KILL_AFTER=10
MIN_STEP=5

SCOPE=${1:-all}
case $SCOPE in all | ops | attention) ;; *) echo "usage: $0 [all|ops|attention]" >&2; exit 2 ;; esac

SMOKE=()
BENCH=()
if [ "$SCOPE" != attention ]; then
  SMOKE+=("$PY benchmarks/ops_bench.py --smoke --device cuda")
  BENCH+=("$PY benchmarks/ops_bench.py --device cuda --dtype float32 bfloat16 --repeats 50")
  # kernel time without the host's per-call cost (which bounds these ops at the issue's shapes)
  BENCH+=("$PY benchmarks/ops_bench.py --device cuda --dtype float32 bfloat16 --repeats 30 --cuda-graphs")
fi
# attention (issue 3): every dtype x head dim once; vs SDPA's flash and cuDNN backends
if [ "$SCOPE" != ops ]; then
  # $ATTN_FLAGS is expanded when the step runs: --no-wgmma when the wgmma kernels failed their check
  SMOKE+=("$PY benchmarks/attention_bench.py --smoke --device cuda \$ATTN_FLAGS")
  BENCH+=("$PY benchmarks/attention_bench.py --device cuda --dtype bfloat16 --repeats 30 \$ATTN_FLAGS")
fi
TESTS="tests/ops tests/models/test_devices.py"
[ "$SCOPE" = all ] && TESTS="$TESTS tests/pipeline/test_pipeline.py"

# step NAME TIMEOUT_S CMD...: runs CMD, logs it, records status and seconds; the limit is cut to what
# is left of the budget, and with under MIN_STEP s left the step is skipped (status 1).
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - RESERVE - KILL_AFTER - SECONDS))
  if [ "$left" -lt "$MIN_STEP" ]; then
    printf '%s\t%s\t%s\n' "$name" skipped 0 >>"$STEPS"
    echo "=== $name: skipped (GPU_CHECK_BUDGET_S=$BUDGET spent)" | tee -a "$LOG"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "=== $name (limit $limit s): $*" >>"$LOG"
  timeout -k "$KILL_AFTER" "$limit" bash -c "$*" >>"$LOG" 2>&1
  local rc=$?
  local status=ok
  if [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ $((SECONDS - t0)) -ge "$limit" ]; }; then
    status=timeout
  elif [ $rc -ne 0 ]; then
    status="fail($rc)"
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$STEPS"
  echo "=== $name: $status in $((SECONDS - t0)) s" | tee -a "$LOG"
  return $rc
}

step env 60 "nvidia-smi -L; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
$PY -c "import ninja" 2>/dev/null || command -v ninja >/dev/null ||
  echo "warning: ninja not found; torch falls back to a serial build (slow)" | tee -a "$LOG"
if step build 240 "FORCE_CUDA=1 $PY setup.py build_ext --inplace"; then
  # the installation as a user's bug report shows it: kernels built, CPU ISA, GPUs, backends per device
  step info 60 "$PY -m sgdm.cli.main info"
  # The Hopper wgmma kernels (sgdm's default on a 9.0 GPU) are checked first, on their own:
  # agreement with the mma.sync kernels, then time. If they fail, the tests and benchmarks run
  # the mma.sync kernels (SGDM_ATTENTION_WGMMA=0): a broken kernel may hang, and each step would
  # wait out its limit (the program itself gives up on a kernel after 20 s: "HANG: <kernel>",
  # exit code 3).
  export ATTN_FLAGS=
  WGMMA_TESTS=()
  if [ "$SCOPE" != ops ] && nvidia-smi --query-gpu=compute_cap --format=csv,noheader | grep -q '^9\.'; then
    if ! step attention-wgmma 240 "set -o pipefail; $CUDA_HOME/bin/nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -Icsrc/include -Icsrc/cuda benchmarks/attention_wgmma.cu -o $WORK/attention_wgmma && $WORK/attention_wgmma | tee $WORK/attention_wgmma.txt"; then
      export SGDM_ATTENTION_WGMMA=0
      ATTN_FLAGS=--no-wgmma
      WGMMA_TESTS=(-k "not wgmma")
      echo "the wgmma kernels failed their check: the other steps run with SGDM_ATTENTION_WGMMA=0" | tee -a "$LOG"
    fi
  fi
  # the model tests cover the UNet path (per-sample GroupNorm affine) against the CPU
  # with pytest-xdist, one worker: a test that crashes the process (a segfault stopped a whole run
  # at its 67th test once) fails alone, and a new worker runs the rest
  XDIST=
  $PY -c "import xdist" 2>/dev/null && XDIST="-n 1"
  step cuda-tests 150 "$PY -m pytest -q $XDIST -m cuda $TESTS ${WGMMA_TESTS[*]@Q}"
  # benchmarks before the sanitizers: the numbers matter most when time is short
  i=0
  for cmd in "${BENCH[@]}"; do
    i=$((i + 1))
    step "bench-$i" 90 "$cmd --json $WORK/bench_$i.json"
  done
  if [ "$SCOPE" != ops ]; then
    # the forward's tile configurations against the production FwdTile (standalone nvcc program)
    step attention-tiles 150 "set -o pipefail; $CUDA_HOME/bin/nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -arch=native -Icsrc/include -Icsrc/cuda benchmarks/attention_tiles.cu -o $WORK/attention_tiles && $WORK/attention_tiles | tee $WORK/attention_tiles.txt"
  fi
  i=0
  for cmd in "${SMOKE[@]}"; do
    i=$((i + 1))
    step "memcheck-$i" 90 "$SANITIZER --tool memcheck --error-exitcode 9 $cmd"
    step "racecheck-$i" 90 "$SANITIZER --tool racecheck --error-exitcode 9 $cmd"
  done
  if [ "$SCOPE" = all ]; then
    # self-labels at the paper's ImageNet scale (issue 7): sgdm k-means alone on the GPU
    step kmeans-paper 150 "set -o pipefail; $PY benchmarks/kmeans_bench.py --device cuda --n 1300000 --dim 768 --k 10000 --json $WORK/kmeans_paper.json | tee $WORK/kmeans_paper.txt"
    # end to end (issue 4): the LSUN-Churches UNet, kernels vs SGDM_KERNELS=0, bf16
    step unet-churches 120 "set -o pipefail; $PY benchmarks/unet_bench.py --config churches --device cuda --precision bf16 --iters 10 --rounds 2 --json $WORK/unet_churches.json | tee $WORK/unet_churches.txt"
    # train.compile / pipe.compile: the same UNet under torch.compile (Inductor) vs eager, both with the
    # kernels; the warm-up iterations hold the two compiles (training step, sampling step)
    step unet-compile 300 "set -o pipefail; $PY benchmarks/unet_bench.py --config churches --device cuda --precision bf16 --compare compile --warmup 3 --iters 10 --rounds 1 --json $WORK/unet_compile.json | tee $WORK/unet_compile.txt"
  fi
fi

# JSON summary: steps, every benchmark's rows, the end-to-end runs' results; then the tables.
echo
echo "log and JSON: $OUT (each step's own files: $WORK)"
$PY - "$OUT" "$WORK" <<'PYEOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
out, work = sys.argv[1:3]


def load(path):  # a step cut short may leave a partial file: the rest of the summary still counts
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        print(f"summary: {path}: unreadable ({err})")
        return None


steps = [dict(zip(("step", "status", "seconds"), line.rstrip("\n").split("\t")))
         for line in open(os.path.join(out, "steps.tsv"))]
benches = [b for b in (load(p) for p in sorted(glob.glob(os.path.join(work, "bench_*.json")))) if b is not None]
results = {os.path.basename(p)[:-len(".json")]: load(p) for p in sorted(glob.glob(os.path.join(work, "*.json")))
           if not os.path.basename(p).startswith("bench_")}
programs = {}  # the standalone nvcc programs' output (no JSON of their own)
for path in sorted(glob.glob(os.path.join(work, "attention_*.txt"))):
    with open(path, errors="replace") as f:
        programs[os.path.basename(path)[:-len(".txt")]] = f.read()[-20000:]
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump({"steps": steps, "benchmarks": benches, "results": results, "programs": programs}, f, indent=2)
if benches:
    sys.path.insert(0, "benchmarks")
    try:
        import attention_bench, ops_bench
    except Exception as err:  # noqa: BLE001 - the JSON is written; the tables are a convenience
        print(f"summary: no tables ({err})")
    else:
        for bench in benches:  # attention rows in their own table: TFLOP/s and the SDPA backend
            fmt = attention_bench if any("sgdm_tflops" in r for r in bench.get("rows", [])) else ops_bench
            try:
                print(fmt.format_table(bench))
            except Exception as err:  # noqa: BLE001
                print(f"summary: a table failed ({err!r})")
            for text in bench.get("mismatches", []):
                print(f"MISMATCH {text}")
            print()
for name, text in programs.items():
    print(f"{name}:\n" + "\n".join(text.splitlines()[-12:]))
HEADLINE = ("device", "speedup", "agreement", "total_s", "iterations", "inertia", "peak_gpu_gib")
for name, result in results.items():  # the end-to-end runs' headline numbers (their tables are in the log)
    if isinstance(result, dict):
        print(f"{name}: {json.dumps({k: result[k] for k in HEADLINE if k in result})}")
PYEOF
echo
printf '%-16s %-10s %s\n' step status seconds
while IFS=$'\t' read -r name status secs; do printf '%-16s %-10s %s\n' "$name" "$status" "$secs"; done <"$STEPS"
! grep -q -v -P '\tok\t' "$STEPS"
