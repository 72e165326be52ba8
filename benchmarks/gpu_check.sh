#!/usr/bin/env bash
# Every GPU check of qconvert in one call, for a machine with an NVIDIA GPU and no registry
# access: runs from the source tree (PYTHONPATH), with the machine's own torch, cupy,
# transformers, safetensors, click, rich, tqdm, pytest (and matplotlib if present).
#
#   bash benchmarks/gpu_check.sh            # results in benchmarks/results/gpu/
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#   COMMIT=$(git rev-parse --short HEAD) OUT=/tmp/g PACK=$OUT/gpu_check.tgz bash benchmarks/gpu_check.sh
#       # a tree copied without .git; PACK: everything in one tarball, rewritten after each part
#       # (the device tool brings back at most 8 files: keep OUT itself outside the tool's $OUT)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh   # default: python3 or python, whichever imports torch
#
# Seven parts, in this order, each under its own time budget (seconds, overridable as
# BUDGET_A..BUDGET_G), 480 s in all (550 s with each part's 10 s kill grace, which a part that ends on
# its own never uses; the full run of
# 2026-12-04 took 413 s); PARTS
# (default abcdefg) names the parts to run, for a rerun of some (PARTS=aeg); every
# part writes its files under $OUT as it finishes, and a part that fails or runs out of time never
# stops the next.  A device fault (an illegal
# instruction, a bad address) poisons the CUDA context of its process: every test file and every
# benched M therefore runs in a process of its own, so a fault costs one file or one M.
#   a  environment (gpu.txt) and every GPU test file (tests/test_*_gpu.py) against the bit-exact
#      references, all files at once, one process each, the two slowest in SHARDS (3) processes
#      (tests/NAME.xml JUnit, tests/NAME.log, or NAME.K.xml and NAME.K.log for slice K; tests.txt:
#      one line per file; torch on TEST_THREADS (2) CPU threads per process), and the W4A8 decode
#      kernels probed one case per process
#      (benchmarks/gpu_probe.py --sweep: probe.txt)
#   b  qconvert bench --kernels: Llama-3-8B shapes, M in {1, 16, 256, 4096} (one process each, 25 s
#      at most: kernels_mM.json), W4A8-IS, W4A8-FS and cuBLAS FP16 with the roofline fraction (and at
#      M > 64 W4A8-IS on the prefill's 64-token tiles, two CTAs per SM: the row w4a8-is-bm64); the
#      mma.sync ceiling: int8 and fp16 tensor-core products alone (benchmarks/mma_peak.py, 15 s at
#      most: mma_peak.json); the W4A8-IS decode with and without its L2 prefetch of the scales and
#      with a pipeline twice as deep (benchmarks/decode_variants.py, 45 s at most, two more builds of
#      the kernel included: decode_variants.json); the benches merged into
#      kernels.json and kernels.png; the roofline model's predictions (roofline.json)
#   c  the decode engine on the synthetic Llama-3-8B: FP16 against is-w4a8, CUDA-graph captured,
#      batch 1 and 16 (e2e_llama3-8b.json)
#   d  GPU quantize of a random-weight Llama-3-8B-shaped checkpoint written here, 2 blocks and a
#      32768-token vocabulary (quantize.json)
#   e  the online Hadamard transform of --rotate hadamard+online (hadamard.json), a Llama-3-8B
#      block's float glue: RoPE, RMSNorm, SwiGLU and the KV-cache write as transformers' and the
#      engine's ops and as qconvert's kernels (benchmarks/glue_speed.py: glue.json), then the other
#      methods' kernels, each scheme and M under its own 20 s, M = 1 of QUIK, FP8 (sm_89+) and I-LLM
#      before their M = 4096 (kernels_quik.json, kernels_zqfp.json, kernels_illm.json, each merged from
#      one process per M)
#   f  I-LLM's integer-only model on its kernels against FP16, end to end, on 4 blocks of the
#      synthetic Llama-3-8B, batch 1 and 16, CUDA-graph captured and eager (e2e_illm.json)
#   g  Nsight Compute's counters of the W4A8 prefill (M = 4096, 256) and decode (M = 1) kernels, IS
#      and FS (benchmarks/profile_w4a8.py: ncu_w4a8.csv); where ncu cannot read the counters (a
#      gVisor machine) the part fails and nothing else is lost
# A summary of each part's exit status and time is in parts.txt.
# benchmarks/gpu_tables.py OUT prints the results as docs/benchmarks.md's tables.
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
  if [ -n "${PACK:-}" ]; then  # written aside, then renamed: a kill leaves the previous tarball whole
    tar czf "$PACK.part" -C "$(dirname "$out")" "$(basename "$out")" && mv "$PACK.part" "$PACK"
  fi
}

test_file() {  # test_file PATH: one GPU test file in processes of its own; one line in tests.txt
  local f=$1 b
  b=$(basename "$f" .py)
  # the two slowest files (each over 120 s beside the others on the H200, 2026-12-04), and the FP8
  # file (since 2026-12-05 its repacked, widened, row-wise and fused tests, never timed there), run as
  # SHARDS round-robin slices of their tests (tests/conftest.py's --shard K/N), one process each,
  # with no pytest plugin needed (the H200 image of 2026-12-04 had xdist 3.8.0; another may not), each
  # slice its own log and XML.  -v: one line per test, which survives the budget's kill (the
  # JUnit XML is written at the end); --durations: each log ends with its ten slowest tests.
  # Every process runs torch on TEST_THREADS CPU threads: ~17 of them share the 16 cores
  local n=1 k rc=0 r line="" names=() pids=()
  case " $SPLIT_TESTS " in *" $b "*) n=$SHARDS ;; esac
  for ((k = 1; k <= n; k++)); do
    local name=$b shard=()
    [ "$n" -gt 1 ] && name=$b.$k && shard=(--shard "$k/$n")
    OMP_NUM_THREADS=$TEST_THREADS MKL_NUM_THREADS=$TEST_THREADS "$PYTHON" -m pytest -v -rfs -p no:cacheprovider \
      --durations=10 "${shard[@]}" "$f" --junitxml "$out/tests/$name.xml" > "$out/tests/$name.log" 2>&1 &
    names+=("$name") pids+=($!)
  done
  for ((k = 1; k <= n; k++)); do
    wait "${pids[k - 1]}"; r=$?
    # pytest's "no tests collected" (5): a file skipped whole (e.g. FP8 below sm_89) is no failure
    [ $r -ne 0 ] && [ $r -ne 5 ] && rc=$r
    [ "$n" -gt 1 ] && line+="${line:+ | }[$k/$n] "
    line+=$(tail -n 1 "$out/tests/${names[k - 1]}.log")
  done
  echo "rc=$rc $f: $line" >> "$out/tests.txt"
}

part_a() {  # the environment block's and the tests' failures both count
  set -o pipefail
  local rc=0
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    # the device copy of the tree may carry no .git: COMMIT, set by the caller, names the commit then
    echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    "$PYTHON" -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)"
  } | tee "$out/gpu.txt" || rc=1
  # every GPU test file at once, the largest first (quantize, the models); -v: one line per test
  # in each log, which survives the budget's kill (the JUnit XML is written at the end)
  mkdir -p "$out/tests"
  : > "$out/tests.txt"
  # beside them, every decode kernel (M = 1 .. 64, IS and FS) probed case by case (probe.txt)
  "$PYTHON" benchmarks/gpu_probe.py --sweep > "$out/probe.txt" 2>&1 &
  local probe=$!
  ls -S tests/test_*_gpu.py | xargs -P 16 -I{} bash -c 'test_file {}'
  wait $probe || rc=1
  grep -q -e "rc=[^0]" -e MISMATCH "$out/probe.txt" && rc=1
  sort -k2 -o "$out/tests.txt" "$out/tests.txt"
  cat "$out/tests.txt"
  grep -q "^rc=[^0]" "$out/tests.txt" && rc=1
  [ "$(wc -l < "$out/tests.txt")" -eq "$(ls tests/test_*_gpu.py | wc -l)" ] || rc=1
  return $rc
}

part_b() {  # a failed M fails the part; the others, the merge and the roofline still run
  local plot=() rc=0 m
  "$PYTHON" -c "import matplotlib" 2>/dev/null && plot=(--plot "$out/kernels.png")
  rm -f "$out"/kernels_m*.json  # an earlier run's, in a reused OUT, must not be merged
  for m in 1 16 256 4096; do
    timeout 25 "$PYTHON" -m qconvert.cli bench --kernels --shapes llama3-8b --m "$m" --json "$out/kernels_m$m.json" || rc=1
  done
  # the mma.sync ceiling the W4A8 prefill is read against (a few seconds)
  timeout 15 "$PYTHON" benchmarks/mma_peak.py --json "$out/mma_peak.json" || rc=1
  # what the scale prefetch and a deeper weight pipeline buy at decode (two more builds, today's plan)
  timeout 45 "$PYTHON" benchmarks/decode_variants.py --json "$out/decode_variants.json" || rc=1
  "$PYTHON" benchmarks/gpu_tables.py --merge "$out/kernels.json" "${plot[@]}" "$out"/kernels_m*.json || rc=1
  "$PYTHON" benchmarks/roofline.py --devices H200 --json "$out/roofline.json" || rc=1
  return $rc
}

part_c() {
  "$PYTHON" -m qconvert.cli bench --synthetic llama3-8b --scheme is-w4a8 --batch 1,16 --budget-s "$((BUDGET_C - 20))" \
    --json "$out/e2e_llama3-8b.json"
}

part_d() {  # --budget-s bounds the whole script, the checkpoint's writing included
  # a 32768-token vocabulary, not 128256: the 3 GB checkpoint's writing left the run 5 s of its budget
  # (H200, 2026-12-04); the embeddings' size changes only the first stage, not a block's time
  "$PYTHON" benchmarks/quantize_speed.py gpu --layers 2 --vocab 32768 --budget-s "$((BUDGET_D - 10))" --json "$out/quantize.json"
}

part_e() {  # one process per scheme and M, as in part b (one M of all three in 25 s timed out)
  local rc=0 s m
  # first, as it is short (2 orders x 4 M, 20 timed calls each)
  timeout 20 "$PYTHON" benchmarks/hadamard_speed.py --json "$out/hadamard.json" || rc=1  # --rotate hadamard+online
  timeout 25 "$PYTHON" benchmarks/glue_speed.py --json "$out/glue.json" || rc=1  # RoPE, RMSNorm, SwiGLU, KV write: kernels or torch ops
  # M = 1 of every scheme before any M = 4096: the decode paths are what changed since the H200 runs
  # of 2026-12-04 (QUIK's 4-bit layers on the repacked W4A8 kernels and its fused split, fp4-fp8's
  # repacked decode kernel, the 8-bit GEMVs), so a budget cut takes prefill rows those runs have
  local fp8=1 schemes="quik-w4a4:quik zqfp-w4a8:zqfp illm-w8a8:illm"
  "$PYTHON" -c "import torch, sys; sys.exit(torch.cuda.get_device_capability() < (8, 9))" || fp8=0  # FP8 tensor cores: sm_89+
  for s in $schemes; do rm -f "$out/kernels_${s##*:}"_m*.json "$out/kernels_${s##*:}.json"; done  # none of an earlier run's left
  for m in 1 4096; do
    for s in $schemes; do
      [ "${s##*:}" = zqfp ] && [ $fp8 = 0 ] && continue
      timeout 20 "$PYTHON" -m qconvert.cli bench --kernels --scheme "${s%%:*}" --m "$m" --json "$out/kernels_${s##*:}_m$m.json" || rc=1
    done
  done
  for s in $schemes; do
    ls "$out/kernels_${s##*:}"_m*.json > /dev/null 2>&1 &&
      { "$PYTHON" benchmarks/gpu_tables.py --merge "$out/kernels_${s##*:}.json" "$out/kernels_${s##*:}"_m*.json || rc=1; }
  done
  return $rc
}

part_f() {  # the integer model on its own engine and the FP16 original, each graph-captured and eager
  "$PYTHON" -m qconvert.cli bench --synthetic llama3-8b --layers 4 --scheme illm-w8a8 --device cuda --prefill 512 \
    --new-tokens 16 --batch 1,16 --repeats 1 --budget-s "$((BUDGET_F - 10))" --json "$out/e2e_illm.json"
}

part_g() {  # counters, last: the timings above never wait on the profiler
  "$PYTHON" benchmarks/profile_w4a8.py --ncu-csv "$out/ncu_w4a8.csv"
}

export -f part_a part_b part_c part_d part_e part_f part_g test_file
export out
export SPLIT_TESTS="test_kernels_w4a8r_gpu test_quantize_device_gpu test_kernels_fp8_gpu" SHARDS=${SHARDS:-3} TEST_THREADS=${TEST_THREADS:-2}
# part g's six ncu cases took 58 s on the H200 (2026-12-04); part e 53 s, before glue_speed.py (up to
# 25 s: four ops, two of them new builds) joined it, so QUIK's kernels (last, measured on that run)
# may be cut; part f 22 s.  In all 480 s: the whole check in 8 minutes
# part b: 95 s since 2026-12-05 (decode_variants.py builds the kernel twice more), taken from part g
BUDGET_A=${BUDGET_A:-140} BUDGET_B=${BUDGET_B:-95} BUDGET_C=${BUDGET_C:-70} BUDGET_D=${BUDGET_D:-45} BUDGET_E=${BUDGET_E:-75}
BUDGET_F=${BUDGET_F:-25} BUDGET_G=${BUDGET_G:-30}
export BUDGET_C BUDGET_D BUDGET_F
PARTS=${PARTS:-abcdefg}  # a rerun names the parts it repeats, e.g. PARTS=aeg
for p in a b c d e f g; do
  case "$PARTS" in *"$p"*) ;; *) continue ;; esac
  budget_var=BUDGET_${p^^}
  part "$p" "${!budget_var}" bash -c "part_$p"
done
cat "$out/parts.txt"
! grep -q "rc=[^0]" "$out/parts.txt"
