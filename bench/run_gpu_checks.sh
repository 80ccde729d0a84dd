#!/usr/bin/env bash
# The GPU checks of a release, on a CUDA host (two GPUs for the sharded decode), results in $OUT:
#   1. the readers-writer lock's cost on a CodeKVCache decode step (quiet GPU, first)
#   2. sharded decode over NCCL, 2 ranks on 2 GPUs, 256K-1M tokens, 28/4 heads, d 128
#   3. the exactness campaign of the Triton code filter (workers spread over the GPUs)
#   4. the kernel, distributed and docs tests, compiled (no interpreter), beside the campaign
# Switches: RUN_LOCK, RUN_DISTRIBUTED, RUN_TESTS (1/0, default 1); CAMPAIGN_WORKERS,
# CAMPAIGN_SECONDS, CAMPAIGN_REPS, CAMPAIGN_QUERIES, CAMPAIGN_SEED (first worker's seed; use a
# new one per run so that runs add new cases).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
NG=$(python -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt"
if [ "${RUN_LOCK:-1}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 120 python bench/bench_lock_gpu.py --out "$OUT/lock_gpu.json" \
    > "$OUT/lock_gpu_log.txt" 2>&1
fi
if [ "$NG" -ge 2 ] && [ "${RUN_DISTRIBUTED:-1}" = 1 ]; then
  timeout 150 python bench/bench_distributed.py --device cuda --backend nccl --world 2 \
    --sizes 262144,524288,1048576 --hq 28 --hkv 4 --dim 128 --out "$OUT/distributed_nccl.json" \
    > "$OUT/distributed_nccl_log.txt" 2>&1
fi
W=${CAMPAIGN_WORKERS:-8}; CASES=${CAMPAIGN_CASES:-100000}; SECS=${CAMPAIGN_SECONDS:-240}
REPS=${CAMPAIGN_REPS:-4}; QUERIES=${CAMPAIGN_QUERIES:-32}; SEED=${CAMPAIGN_SEED:-1000}
for i in $(seq 0 $((W - 1))); do
  # one CPU thread per worker: the workers, not BLAS, fill the cores
  CUDA_VISIBLE_DEVICES=$((i % NG)) OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 timeout $((SECS + 90)) \
    python bench/exactness_campaign.py --device cuda --cases $((CASES / W)) --seed $((SEED + i)) \
    --reps "$REPS" --queries "$QUERIES" --max-seconds "$SECS" --out "$OUT/exactness_cuda_$i.json" \
    > "$OUT/exactness_cuda_$i.log" 2>&1 &
done
if [ "${RUN_TESTS:-1}" = 1 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout 330 python -m pytest -q -p no:cacheprovider tests/kernels tests/distributed \
    tests/test_docs.py > "$OUT/pytest_gpu.txt" 2>&1
  echo "pytest exit $?" >> "$OUT/pytest_gpu.txt"
  tail -3 "$OUT/pytest_gpu.txt"
fi
wait
cat "$OUT/lock_gpu_log.txt" 2>/dev/null; tail -q -n 2 "$OUT"/exactness_cuda_*.log
# few files come back from a remote run: one merged JSON, the workers' files in one archive
python bench/exactness_campaign.py --device cuda --merge "$OUT"/exactness_cuda_[0-9]*.json \
  --out "$OUT/exactness_cuda.json" > /dev/null
tar -czf "$OUT/exactness_cuda_workers.tgz" -C "$OUT" $(cd "$OUT" && ls exactness_cuda_[0-9]*) \
  && rm -f "$OUT"/exactness_cuda_[0-9]*
tail -15 "$OUT/distributed_nccl_log.txt" 2>/dev/null
