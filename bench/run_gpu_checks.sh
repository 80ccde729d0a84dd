#!/usr/bin/env bash
# The GPU checks of a release, on a CUDA host (two GPUs for the sharded decode), results in $OUT:
#   1. sharded decode over NCCL, 2 ranks on 2 GPUs, 256K-1M tokens, 28/4 heads, d 128
#   2. the exactness campaign of the Triton code filter (workers spread over the GPUs)
#   3. the kernel, distributed and docs tests, compiled (no interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
NG=$(python -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
if [ "$NG" -ge 2 ]; then
  timeout 150 python bench/bench_distributed.py --device cuda --backend nccl --world 2 \
    --sizes 262144,524288,1048576 --hq 28 --hkv 4 --dim 128 --out "$OUT/distributed_nccl.json" \
    > "$OUT/distributed_nccl_log.txt" 2>&1
fi
W=${CAMPAIGN_WORKERS:-8}; CASES=${CAMPAIGN_CASES:-100000}; SECS=${CAMPAIGN_SECONDS:-240}
for i in $(seq 0 $((W - 1))); do
  CUDA_VISIBLE_DEVICES=$((i % NG)) timeout $((SECS + 60)) python bench/exactness_campaign.py --device cuda \
    --cases $((CASES / W)) --seed $((1000 + i)) --max-seconds "$SECS" --out "$OUT/exactness_cuda_$i.json" \
    > "$OUT/exactness_cuda_$i.log" 2>&1 &
done
CUDA_VISIBLE_DEVICES=0 timeout 330 python -m pytest -q -p no:cacheprovider tests/kernels tests/distributed \
  tests/test_docs.py > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest_gpu.txt"
wait
tail -3 "$OUT/pytest_gpu.txt"; tail -q -n 2 "$OUT"/exactness_cuda_*.log; tail -15 "$OUT/distributed_nccl_log.txt" 2>/dev/null
