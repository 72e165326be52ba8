#!/usr/bin/env bash
# Every GPU check of qconvert in one call, for a machine with an NVIDIA GPU and no registry
# access: runs from the source tree (PYTHONPATH), needs torch, cupy, transformers,
# safetensors, click, rich, tqdm and pytest from the machine's own image.
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/gpu/
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Writes: gpu.txt (device, driver, date, commit), kernels_gpu.xml (JUnit of the W4A8, FP8 and
# QUIK kernel tests against their bit-exact torch references) and kernels_gpu.log, then the
# benchmarks: kernels.json (+ kernels.png if matplotlib is installed), kernels_zqfp.json (sm_89+),
# kernels_quik.json, kernels_illm.json, e2e_llama3-8b.json and e2e_llama3-8b_quik.json (synthetic random-weight
# Llama-3-8B, prefill 2048 and decode 128 at batch 1 and 16) and bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  python -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)"
} | tee "$out/gpu.txt"
status=0
python -m pytest -q -rs tests/test_kernels_gpu.py tests/test_kernels_fp8_gpu.py tests/test_kernels_quik_gpu.py tests/test_kernels_illm_gpu.py --junitxml "$out/kernels_gpu.xml" 2>&1 | tee "$out/kernels_gpu.log" || status=1
plot=()
python -c "import matplotlib" 2>/dev/null && plot=(--plot "$out/kernels.png")
(
  rc=0
  python -m qconvert.cli bench --kernels --shapes all --json "$out/kernels.json" "${plot[@]}" || rc=1
  python -m qconvert.cli bench --kernels --scheme quik-w4a4 --json "$out/kernels_quik.json" || rc=1
  python -m qconvert.cli bench --kernels --scheme illm-w8a8 --json "$out/kernels_illm.json" || rc=1
  if python -c "import torch, sys; sys.exit(torch.cuda.get_device_capability() < (8, 9))"; then
    python -m qconvert.cli bench --kernels --scheme zqfp-w4a8 --json "$out/kernels_zqfp.json" || rc=1
  fi
  python -m qconvert.cli bench --synthetic llama3-8b --json "$out/e2e_llama3-8b.json" || rc=1
  python -m qconvert.cli bench --synthetic llama3-8b --scheme quik-w4a4 --json "$out/e2e_llama3-8b_quik.json" || rc=1
  exit $rc
) 2>&1 | tee "$out/bench.log" || status=1
exit $status
