#!/usr/bin/env bash
# Device diagnosis after a fault: every GPU test file in its own process (a device fault poisons
# the CUDA context and fails every later test of that process), the repacked W4A8 linear probed
# case by case (benchmarks/gpu_probe.py), and the failing case under compute-sanitizer.
# Everything lands in $OUT/diag.tgz (the device tool returns at most 8 files).
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
D=$OUT/d; mkdir -p $D
P=python3
t0=$SECONDS
ls tests/test_*_gpu.py | grep -v -e fp8 -e "test_kernels_gpu.py" | xargs -P 8 -I{} bash -c 'f={}; b=$(basename $f .py); timeout 140 '$P' -m pytest -q -rf -p no:cacheprovider $f --junitxml '$D'/$b.xml > '$D'/$b.log 2>&1; echo "$? $f $(tail -1 '$D'/$b.log)"' > $D/files.txt &
files=$!
timeout 100 $P benchmarks/gpu_probe.py --sweep > $D/probe.txt 2>&1; echo "probe rc=$? $((SECONDS-t0))s"
cat $D/probe.txt | cut -c1-200
timeout 60 compute-sanitizer --tool memcheck --show-backtrace device --print-limit 4 $P benchmarks/gpu_probe.py 16 576 576 w4a8-is > $D/memcheck.log 2>&1; echo "memcheck rc=$? $((SECONDS-t0))s"
grep -m 14 "=========" $D/memcheck.log | cut -c1-200
timeout 45 compute-sanitizer --tool synccheck --print-limit 4 $P benchmarks/gpu_probe.py 16 576 576 w4a8-is > $D/synccheck.log 2>&1; echo "synccheck rc=$? $((SECONDS-t0))s"
grep -m 10 "=========" $D/synccheck.log | cut -c1-200
wait $files
echo "files $((SECONDS-t0))s"; cat $D/files.txt | cut -c1-200
mkdir -p $D/cache && cp $($P -c "from qconvert_kernels import launch; print(launch.cache_dir())")/w4a8_repacked* $D/cache/ 2>/dev/null
tar czf $OUT/diag.tgz -C $OUT d && ls -la $OUT/diag.tgz
