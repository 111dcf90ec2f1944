#!/usr/bin/env bash
# Paper-scale figures from one GPU call, in under 9 minutes, everything under $OUT:
#   1. overhead  benchmarks/hmole_overhead.py: HMoLE vs one PEFT LoRA, step and generation time
#                ratios at bf16, batch 16 x 512 (SmolLM2-135M)
#   2. compare   `fedamole compare` of fedamole, fedamole-r, fedit-ft and local, 2 seeds, the
#                reduced paper protocol of configs/gpu_suite.yaml on the shared Natural Instructions
#                sample, all 8 runs at once under CUDA MPS (started here if not running, stopped
#                at exit)
# then $OUT/summary.md and summary.json: machine, torch, each stage's command, wall time, exit
# status and figures. Each stage runs under `timeout`, so a stage that overruns is cut, recorded
# as timed out, and the summary still says what finished; rerunning with the same OUT skips the
# comparison's finished runs and resumes killed ones from their checkpoints.
#
# On a GPU machine without a package registry, after staging (../shared/gpu/stage.sh here, then
# `source .gpu-stage/env.sh 1` and `... 2` as two calls), the suite is the third call, from the
# project root, carrying .gpu-stage/c3 and .gpu-stage/env.sh:
#   source .gpu-stage/env.sh 3 && bash benchmarks/gpu_suite.sh
# The caller sets the environment (env.sh exports PYTHONPATH=src and the staged packages); the
# script only picks the interpreter: $PYTHON, else .venv/bin/python under SMOKE=1 if present, else
# python3.
#
# SMOKE=1 runs the same pipeline on the CPU with the tiny random Llama and tiny budgets (a minute
# or two on 2 cores); tests/test_gpu_suite.py runs it.
#
# Settings (environment): OUT (default out/gpu_suite), DATA (default ../shared/data beside the
# project), SMOKE (0|1), PYTHON, OVERHEAD_TIMEOUT and COMPARE_TIMEOUT (seconds per stage).
set -uo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_suite.sh: $*" >&2; exit 2; }
is_seconds() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

SMOKE=${SMOKE:-0}
[[ $SMOKE == 0 || $SMOKE == 1 ]] || die "SMOKE=$SMOKE: use SMOKE=1 (CPU, tiny model) or leave it unset"
if [[ $SMOKE == 1 && -x .venv/bin/python ]]; then default_python=.venv/bin/python; else default_python=python3; fi
PY=${PYTHON:-$default_python}
DATA=${DATA:-../shared/data}
OUT=${OUT:-out/gpu_suite}
if [[ $SMOKE == 1 ]]; then OVERHEAD_TIMEOUT=${OVERHEAD_TIMEOUT:-120}; COMPARE_TIMEOUT=${COMPARE_TIMEOUT:-240}
else OVERHEAD_TIMEOUT=${OVERHEAD_TIMEOUT:-120}; COMPARE_TIMEOUT=${COMPARE_TIMEOUT:-330}; fi
for name in OVERHEAD_TIMEOUT COMPARE_TIMEOUT; do
  is_seconds "${!name}" || die "$name=${!name}: give a whole number of seconds, e.g. $name=300"
done
[[ -d $DATA/natural_instructions ]] || die "no Natural Instructions sample at $DATA/natural_instructions: \
set DATA to the folder holding natural_instructions/ (on the GPU machine: source .gpu-stage/env.sh 3 first)"
DATA=$(cd "$DATA" && pwd)
"$PY" -c "import fedamole" 2>/dev/null || die "$PY cannot import fedamole: run from a checkout with \
PYTHONPATH=src (on the GPU machine: source .gpu-stage/env.sh 3), or set PYTHON to an environment that has it"
[[ $SMOKE == 1 ]] || "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || die "no CUDA \
device visible to $PY: run on a GPU machine, or SMOKE=1 for the same pipeline on the CPU"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || die "cannot create OUT=$OUT"
STAGES=$OUT/stages.tsv
: > "$STAGES"

# ---------------------------------------------------------------------------------- CUDA MPS
mps_note="not used (no nvidia-smi)"
stop_mps() { echo quit | nvidia-cuda-mps-control; }
cuda_works() { timeout 60 "$PY" -c "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"; }
if [[ $SMOKE == 1 ]]; then
  mps_note="not used (SMOKE=1, CPU)"
elif command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
  if pgrep -f nvidia-cuda-mps-control >/dev/null; then
    mps_note="already running"
  elif nvidia-cuda-mps-control -d; then
    trap stop_mps EXIT
    if cuda_works; then mps_note="started by the suite, stopped at its end"
    else stop_mps; trap - EXIT; mps_note="failed (CUDA did not start under MPS): runs share the GPU by time-slicing"; fi
  else
    mps_note="could not start nvidia-cuda-mps-control: runs share the GPU by time-slicing"
  fi
fi

# ---------------------------------------------------------------------------------- stages
# stage NAME SECONDS CMD...: runs CMD under timeout, its output in $OUT/NAME.log, and appends
# name, exit status, wall seconds, limit and the command to $STAGES.
stage() {
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" "$*" >> "$STAGES"
  echo "   exit $rc after $((SECONDS - start))s; log $OUT/$name.log"
}

if [[ $SMOKE == 1 ]]; then
  overhead_args=(--model tiny-random-llama --device cpu --batch 2 --seq 32 --steps 2 --warmup 1 --gen-repeats 1)
  compare_args=(--jobs 2
    --set model.name=tiny-random-llama --set model.device=cpu --set model.dtype=float32
    --set "optim.mixed_precision='no'" --set model.max_length=1024 --set federation.num_clients=2
    --set federation.rounds=1 --set federation.local_steps=2 --set federation.batch_size=2
    --set hmole.num_experts=4 --set data.val_cap=3 --set data.test_cap=4
    --set eval.max_new_tokens=3)
else
  overhead_args=(--device cuda --dtype bfloat16 --batch 16 --seq 512)
  compare_args=(--jobs 8)
fi

methods=fedamole,fedamole-r,fedit-ft,local seeds=42,43
[[ $SMOKE == 1 ]] && seeds=42  # the pipeline once per method: the smoke checks plumbing, not spread
stage overhead "$OVERHEAD_TIMEOUT" "$PY" benchmarks/hmole_overhead.py "${overhead_args[@]}" \
  --json "$OUT/hmole_overhead.json"
stage compare "$COMPARE_TIMEOUT" "$PY" -m fedamole.cli compare --config configs/gpu_suite.yaml \
  --methods "$methods" --seeds "$seeds" --out "$OUT/compare" \
  --set "data.path=$DATA/natural_instructions" "${compare_args[@]}"

"$PY" benchmarks/gpu_suite_summary.py --out "$OUT" --smoke "$SMOKE" --mps "$mps_note" \
  --methods "$methods" --seeds "$seeds"
