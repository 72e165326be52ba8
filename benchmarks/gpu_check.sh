#!/usr/bin/env bash
# Every GPU check of qconvert in one call, for a machine with an NVIDIA GPU and no registry
# access: runs from the source tree (PYTHONPATH), with the machine's own torch, cupy,
# transformers, safetensors, click, rich, tqdm, pytest (and matplotlib if present).
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/gpu/
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#   COMMIT=$(git rev-parse --short HEAD) OUT=$OUT bash benchmarks/gpu_check.sh   # a tree copied without .git
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh   # default: python3 or python, whichever imports torch
#
# Six parts, in this order, each under its own time budget (seconds, overridable as
# BUDGET_A..BUDGET_F), about 8 minutes in all on an H200; every part writes its files under
# $OUT as it finishes, and a part that fails or runs out of time never stops the next:
#   a  environment (gpu.txt) and the GPU kernel tests against their bit-exact references
#      (kernels_gpu.xml JUnit, kernels_gpu.log)
#   b  qconvert bench --kernels: Llama-3-8B shapes, M in {1, 16, 256, 4096}, W4A8-IS, W4A8-FS and
#      cuBLAS FP16 with the roofline fraction (kernels.json, kernels.png, roofline.json)
#   c  the decode engine on the synthetic Llama-3-8B: FP16 against is-w4a8, CUDA-graph captured,
#      batch 1 and 16 (e2e_llama3-8b.json)
#   d  GPU quantize of a random-weight Llama-3-8B-shaped checkpoint written here (quantize.json)
#   e  the other methods' kernels: QUIK, FP8 (sm_89+), I-LLM (kernels_quik.json, ...), and the
#      online Hadamard transform of --rotate hadamard+online (hadamard.json)
#   f  I-LLM's integer-only model on its kernels against FP16, end to end, on 4 blocks of the
#      synthetic Llama-3-8B, batch 1 and 16, CUDA-graph captured and eager (e2e_illm.json)
# A summary of each part's exit status and time is in parts.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results/gpu}"
# the interpreter that holds torch (the GPU image names it python3 and may have no plain python);
# PYTHON overrides
if [ -z "${PYTHON:-}" ]; then
  for c in python3 python; do
    if command -v "$c" > /dev/null && "$c" -c "import torch" 2> /dev/null; then PYTHON=$c; break; fi
  done
fi
PYTHON=${PYTHON:-python3}
export PYTHON
mkdir -p "$out"
: > "$out/parts.txt"

part() {  # part NAME BUDGET COMMAND...: run under a time budget, log, record status and time
  local name=$1 budget=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" "$@" > "$out/part_$name.log" 2>&1
  local rc=$?
  echo "part $name: rc=$rc ($((SECONDS - t0)) s of $budget s)" | tee -a "$out/parts.txt"
}

part_a() {  # the environment block's and the tests' failures both count (pipefail: tee's status hides nothing)
  set -o pipefail
  local rc=0
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # the device copy of the tree may carry no .git: COMMIT, set by the caller, names the commit then
    echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    "$PYTHON" -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)"
  } | tee "$out/gpu.txt" || rc=1
  # every GPU test file (tests/test_*_gpu.py): the kernels against their references first, then the
  # models on them (the engine, I-LLM's integer model, GPU quantize), so a budget's kill takes the latter;
  # -v: one line per test in the log, which survives the budget's kill (the JUnit XML is written at the end)
  local kernels=(tests/test_kernels*_gpu.py) models=() f
  for f in tests/test_*_gpu.py; do [[ $f == tests/test_kernels* ]] || models+=("$f"); done
  "$PYTHON" -m pytest -v -rs "${kernels[@]}" "${models[@]}" --junitxml "$out/kernels_gpu.xml" 2>&1 | tee "$out/kernels_gpu.log" || rc=1
  return $rc
}

part_b() {  # a failed kernel bench fails the part even though the roofline after it runs
  local plot=() rc=0
  "$PYTHON" -c "import matplotlib" 2>/dev/null && plot=(--plot "$out/kernels.png")
  "$PYTHON" -m qconvert.cli bench --kernels --shapes llama3-8b --m 1,16,256,4096 --json "$out/kernels.json" "${plot[@]}" || rc=1
  "$PYTHON" benchmarks/roofline.py --devices H200 --json "$out/roofline.json" || rc=1
  return $rc
}

part_c() {
  "$PYTHON" -m qconvert.cli bench --synthetic llama3-8b --scheme is-w4a8 --batch 1,16 --budget-s "$((BUDGET_C - 20))" \
    --json "$out/e2e_llama3-8b.json"
}

part_d() {
  "$PYTHON" benchmarks/quantize_speed.py gpu --layers 4 --budget-s "$((BUDGET_D - 20))" --json "$out/quantize.json"
}

part_e() {
  local rc=0
  # first, as it is short (2 orders x 4 M, 20 timed calls each); the benches below fill most of the budget
  "$PYTHON" benchmarks/hadamard_speed.py --json "$out/hadamard.json" || rc=1  # --rotate hadamard+online's transform
  "$PYTHON" -m qconvert.cli bench --kernels --scheme quik-w4a4 --m 1,16,256,4096 --json "$out/kernels_quik.json" || rc=1
  "$PYTHON" -m qconvert.cli bench --kernels --scheme illm-w8a8 --m 1,16,256,4096 --json "$out/kernels_illm.json" || rc=1
  if "$PYTHON" -c "import torch, sys; sys.exit(torch.cuda.get_device_capability() < (8, 9))"; then
    "$PYTHON" -m qconvert.cli bench --kernels --scheme zqfp-w4a8 --m 1,16,256,4096 --json "$out/kernels_zqfp.json" || rc=1
  fi
  return $rc
}

part_f() {  # the integer model on its own engine and the FP16 original, each graph-captured and eager
  "$PYTHON" -m qconvert.cli bench --synthetic llama3-8b --layers 4 --scheme illm-w8a8 --device cuda --prefill 512 \
    --new-tokens 16 --batch 1,16 --repeats 1 --budget-s "$((BUDGET_F - 15))" --json "$out/e2e_illm.json"
}

export -f part_a part_b part_c part_d part_e part_f
export out
BUDGET_A=${BUDGET_A:-120} BUDGET_B=${BUDGET_B:-90} BUDGET_C=${BUDGET_C:-90} BUDGET_D=${BUDGET_D:-70} BUDGET_E=${BUDGET_E:-60}
BUDGET_F=${BUDGET_F:-50}
export BUDGET_C BUDGET_D BUDGET_F
part a "$BUDGET_A" bash -c part_a
part b "$BUDGET_B" bash -c part_b
part c "$BUDGET_C" bash -c part_c
part d "$BUDGET_D" bash -c part_d
part e "$BUDGET_E" bash -c part_e
part f "$BUDGET_F" bash -c part_f
cat "$out/parts.txt"
! grep -q "rc=[^0]" "$out/parts.txt"
