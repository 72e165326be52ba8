#!/usr/bin/env bash
# The parts of gpu_check.sh that the decode fault (M > 8 on the repacked W4A8 decode kernel) left
# unmeasured, each M in a process of its own so a fault loses one M; then the sanitizer on two
# failing decode cases.  Results in $OUT/rerun.tgz (the device tool returns at most 8 files).
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
D=$OUT/r; mkdir -p $D
P=python3
t0=$SECONDS
pack() { tar czf $OUT/.rerun.tgz -C $OUT r && mv $OUT/.rerun.tgz $OUT/rerun.tgz; }
{ echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"; echo "commit: ${COMMIT:-unknown} + benchmarks/gpu_rerun.sh"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader; } > $D/gpu.txt
for m in 1 8 256 4096; do
  timeout 35 $P -m qconvert.cli bench --kernels --shapes llama3-8b --m $m --json $D/kernels_m$m.json > $D/kernels_m$m.log 2>&1
  echo "kernels M=$m rc=$? $((SECONDS-t0))s"; pack
done
timeout 20 $P benchmarks/roofline.py --devices H200 --json $D/roofline.json > $D/roofline.log 2>&1
timeout 80 $P -m qconvert.cli bench --synthetic llama3-8b --scheme is-w4a8 --batch 1 --budget-s 60 --json $D/e2e_llama3-8b.json > $D/e2e.log 2>&1
echo "e2e rc=$? $((SECONDS-t0))s"; pack
for c in "32 4096 4096 w4a8-is" "16 576 576 w4a8-fs"; do
  timeout 20 compute-sanitizer --tool memcheck --print-limit 3 $P benchmarks/gpu_probe.py $c > "$D/memcheck_${c// /_}.log" 2>&1
  echo "memcheck $c rc=$? $((SECONDS-t0))s"; grep -m 8 "=========" "$D/memcheck_${c// /_}.log" | cut -c1-220
done
for s in quik-w4a4 illm-w8a8 zqfp-w4a8; do
  timeout 25 $P -m qconvert.cli bench --kernels --scheme $s --m 1,16,256,4096 --json $D/kernels_$s.json > $D/kernels_$s.log 2>&1
  echo "kernels $s rc=$? $((SECONDS-t0))s"; pack
done
pack
for f in $D/kernels_m*.log $D/e2e.log; do tail -14 $f | cut -c1-170; done
