#!/usr/bin/env bash
# The GPU measurements of the open issues, one group per call (each fits a 10-minute
# device call); results in $OUT. Real keys: carry bench/cache/gpu_real_keys.npz
# (python bench/make_gpu_keys.py --n-tokens 8192 makes it on the CPU).
#   decode   the decode loop with the certificate, in-place replay and the filter sweep (issue 21)
#   faiss    the CPU batch path's thread scaling on the GPU host's 16 cores (issue 24)
#   generate greedy generate() with CodeCache vs StaticCache + SDPA, both captured (issue 22)
#   striped  the striped decode step on 1 and 2 GPUs (issue 26; needs a 2-GPU machine)
#   tests    the code cache's kernel and integration tests, compiled
#   eager    greedy generate() without CUDA graphs, 8B shape at 128K B 1
#   replay   the replay and kernel tests, then the decode loop at 128K (eager rows: the cache's own
#            graphs, attend(add=); the group_union step)
#   b8       greedy generate() at 8B shapes, 32K, B 8, the prefill in 8K chunks
#   eps      the guarded step (tau with eps): its kernel and integration tests compiled, the decode loop's
#            eps rows at 128K, and greedy generate() with register_code_attention(certified=True), 8B
#            shape, 128K, B 1 (run once, 2026-12-05, on an H100: bench/results/*_eps.json, *_certified*.json)
#   count    STILL OWED: how often the guard fires in generate() (--count-guard; not timed against the
#            others, its counting adds three small launches a layer step): certified at the default
#            calibration, then calibrated at eps/2 with the group's union; also the kernel tests compiled
#   owed     what is still owed, in one call (~470 s at most): kernels, then count
#   kernels  where a captured decode step's time goes: each kernel's GPU time in one replay against the
#            step's time in the loop (bench/diag_step_kernels.py; 28/4 and 32/8 heads, 16K and 128K), and at
#            B 1 the fused step over the filter's launch parameters (--sweep)
#   prepare  the step's first launch with the add in its own program (the new default): the decode-step
#            tests compiled, the step's variants (bench/diag_step_kernels.py --variants)
#            at 128K, then the decode loop at 128K, d 128, B 1 and 8
#   ceiling  greedy generate() at the 8B shape with a loop whose attention reads nothing (--ceiling: the most
#            any attention can gain end to end): 32K, B 8, the prefill in 8K chunks (ran on 2026-12-06,
#            H100: bench/results/generate_gpu_h100_2026-12-06_{ceiling,8b_32k_b8_ceiling}.json)
#   pdl      programmatic dependent launches (CodeKVCache.pdl): the decode-step tests compiled, the step's
#            variants (PDL off) at 128K and 16K, B 1, the decode loop at every size (rows with plain launches)
#   ride     a step of two launches (ran on 2026-12-06, H100: bench/results/step_variants_h100_2026-12-06_ride.json): the add's program
#            in the filter's launch (add_in_filter=True) and the Hadamard rotation's transform inside the
#            filter (rotation="hadamard", rotate_inside=True). The decode-step and replay tests compiled,
#            the step's variants at 128K and 16K, d 128 and d 64, B 1, and 128K B 8 (if one wins: make it
#            the default, then run loop)
#   form     the step's forms where the two-launch step (CodeKVCache.step_form) is the default: the
#            variants at d 64 (16K-128K, B 1 and 8) and d 128 (32K B 1, 16K B 8), then the decode-step and
#            replay tests compiled
#   topk     the top-k mode (decode_step(topk=)): its tests and the decode-step tests compiled, then
#            bench/bench_topk_step.py (top-k step, threshold step and SDPA, d 128 and 64, 16K-128K, B 1 and 8;
#            ran on 2026-12-06, H100: bench/results/topk_step_h100_2026-12-06.json)
#   (ran once on 2026-12-06, H100, then their experiments reverted: the add's program as a function apart,
#   a radix select; records bench/results/step_variants_h100_2026-12-06_apart.json, topk_diag_h100_2026-12-06.json,
#   decode_loop_h100_2026-12-06_run12.json)
#   topkprof the top-k mode's tests compiled (the chunked selection now the default up to 16K), then where
#            its step's time goes, kernel by kernel (diag_topk.py --profile; ran on 2026-12-06, H100:
#            topk_diag_h100_2026-12-06_profile.json)
#   topkshare the top-k tests compiled, then the top-k step's kernels at 128K B 1 keeping 0.01% and 10% of
#            the keys (does the attend pass's time follow the values it reads? No: ran on 2026-12-06, H100,
#            topk_diag_h100_2026-12-06_top*.json)
#   gather   the top-k tests compiled, then where the top-k step's time goes with its softmax over
#            torch.topk's k + 1 best (the gather, now the default) and with the scan of every score
#            (diag_topk.py --profile)
#   gatherloop the top-k step in the decode loop beside the threshold step and SDPA (bench_topk_step.py:
#            both softmax forms timed alone too), d 128 and 64, 16K-128K, B 1 and 8
#   select   the selection on the device (hsr/kernels/_select.py) and top-k tests compiled, then where the top-k
#            step's time goes with it, and the selection alone beside torch.topk (diag_topk.py --profile; ran on
#            2026-12-06, H100, 128K B 1 and 8: topk_diag_h100_2026-12-06_select{,_first}.json)
#   selectloop the top-k and selection tests compiled, then the top-k step with the selection on the device in the
#            decode loop (bench_topk_step.py, as gatherloop; ran on 2026-12-06, H100: topk_step_h100_2026-12-06_select.json)
#   d256     the fused step's forms (two launches or three; diag_step_kernels.py --variants) at d 256,
#            14/2 heads (pairs of real heads side by side), 16K-128K, B 1: which form step_form should pick
#   loop256  the decode loop at d 256 (14/2 heads), 16K and 128K, B 1 and 8 (plain launches, the default
#            there since step_variants_h100_2026-12-06_d256.json), then the decode-step tests compiled
#   loop128  the decode loop at d 128, 16K and 32K, B 1: the two-launch step there (step_form), in a loop
#   loop     the decode loop at every size (16K-128K, d 128 and 64, B 1 and 8)
#   ncu      Nsight Compute on one eager decode step's three kernels at 128K, B 1 (bench/profile_step_ncu.py):
#            throughput, occupancy and warp stall reasons, as text (ran on 2026-12-06, H100:
#            bench/results/ncu_step_h100_2026-12-06_{128k,16k}_b1.txt)
#   full     every test that touches the GPU, compiled (no interpreter): the kernel, device-cache, distributed,
#            PowerAttention, protocol and docs tests, spread over 12 pytest workers (pytest-xdist where the image
#            has it, else 8 processes by file; TESTS_TIMEOUT s each, default 560); one log, $OUT/full_tests.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt"
case "${1:-decode}" in
  decode)   timeout 560 python bench/bench_decode_loop.py --sweep --out "$OUT/decode_loop.json" 2>&1 | tee "$OUT/decode_loop_log.txt" ;;
  faiss)    timeout 560 python bench/bench_faiss.py --threads-scaling 1,2,4,8,16 --out "$OUT/faiss_threads.json" 2>&1 | tee "$OUT/faiss_log.txt" ;;
  generate) timeout 560 python bench/bench_generate_gpu.py --out "$OUT/generate_gpu.json" 2>&1 | tee "$OUT/generate_log.txt" ;;
  striped)  timeout 560 python bench/bench_striped.py --worlds 1,2 --out "$OUT/striped.json" 2>&1 | tee "$OUT/striped_log.txt" ;;
  tests)    timeout 560 python -m pytest -q -p no:cacheprovider tests/kernels/test_codes.py tests/kernels/test_decode_step.py \
              tests/integrations/test_device_cache.py 2>&1 | tee "$OUT/tests_log.txt" ;;
  eager)    timeout 560 python bench/bench_generate_gpu.py --shapes 8b --n 131072 --batch 1 --qk-gain 4 --dense-mode \
              --eager --new 32 --out "$OUT/generate_gpu_eager.json" 2>&1 | tee "$OUT/generate_eager_log.txt" ;;
  replay)   timeout 240 python -m pytest -q -p no:cacheprovider tests/kernels/test_replay.py tests/kernels/test_decode_step.py \
              tests/integrations/test_device_cache.py 2>&1 | tee "$OUT/tests_log.txt"
            timeout 330 python bench/bench_decode_loop.py --n 131072 --dims 128 --batch 1 8 --reps 3 \
              --out "$OUT/decode_loop_replay.json" 2>&1 | tee "$OUT/decode_loop_log.txt" ;;
  b8)       timeout 560 python bench/bench_generate_gpu.py --shapes 8b --n 32768 --batch 8 --qk-gain 4 --dense-mode \
              --prefill-chunk 8192 --new 16 --out "$OUT/generate_gpu_8b_32k_b8.json" 2>&1 | tee "$OUT/generate_b8_log.txt" ;;
  eps)      timeout 220 python -m pytest -q -p no:cacheprovider tests/kernels/test_decode_step.py tests/kernels/test_replay.py \
              tests/integrations/test_device_cache.py 2>&1 | tee "$OUT/tests_log.txt"
            timeout 220 python bench/bench_decode_loop.py --n 131072 --dims 128 --batch 1 8 --reps 3 \
              --out "$OUT/decode_loop_eps.json" 2>&1 | tee "$OUT/decode_loop_log.txt"
            timeout 150 python bench/bench_generate_gpu.py --shapes 8b --n 131072 --batch 1 --qk-gain 4 --certified \
              --new 64 --out "$OUT/generate_gpu_certified.json" 2>&1 | tee "$OUT/generate_certified_log.txt"
            timeout 150 python bench/bench_generate_gpu.py --shapes 8b --n 131072 --batch 1 --qk-gain 4 --certified \
              --calibrate-at 5e-4 --group-union --new 64 --out "$OUT/generate_gpu_certified_half_union.json" 2>&1 \
              | tee -a "$OUT/generate_certified_log.txt" ;;
  count)    timeout 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_decode_step.py \
              tests/integrations/test_device_cache.py -k "count or guard or certified" 2>&1 | tee "$OUT/tests_log.txt"
            for extra in "" "--calibrate-at 5e-4 --group-union"; do
              timeout 140 python bench/bench_generate_gpu.py --shapes 8b --n 131072 --batch 1 --qk-gain 4 --certified \
                --count-guard $extra --new 32 --out "$OUT/generate_gpu_guard_counts${extra:+_half_union}.json" 2>&1 \
                | tee -a "$OUT/generate_count_log.txt"
            done ;;
  prepare)  timeout 120 python -m pytest -q -p no:cacheprovider tests/kernels/test_decode_step.py 2>&1 \
              | tee "$OUT/tests_log.txt"
            timeout 70 python bench/diag_step_kernels.py --configs 4:131072:1 --variants \
              --out "$OUT/step_variants.json" 2>&1 | tee "$OUT/step_variants_log.txt"
            timeout 170 python bench/bench_decode_loop.py --n 131072 --dims 128 --batch 1 8 --reps 3 \
              --out "$OUT/decode_loop_prepare.json" 2>&1 | tee "$OUT/decode_loop_log.txt" ;;
  ceiling)  timeout 560 python bench/bench_generate_gpu.py --shapes 8b --n 32768 --batch 8 --qk-gain 4 --dense-mode \
              --ceiling --prefill-chunk 8192 --new 16 --out "$OUT/generate_gpu_8b_32k_b8_ceiling.json" 2>&1 \
              | tee "$OUT/generate_ceiling_log.txt" ;;
  pdl)      timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_decode_step.py 2>&1 | tee "$OUT/tests_log.txt"
            timeout 100 python bench/diag_step_kernels.py --configs 4:131072:1 4:16384:1 --variants \
              --out "$OUT/step_variants.json" 2>&1 | tee "$OUT/step_variants_log.txt"
            timeout 300 python bench/bench_decode_loop.py --n 131072 16384 32768 --dims 128 64 --batch 1 8 --reps 3 \
              --out "$OUT/decode_loop_pdl.json" 2>&1 | tee "$OUT/decode_loop_log.txt" ;;
  ride)     timeout 240 python -m pytest -q -p no:cacheprovider tests/kernels/test_decode_step.py tests/kernels/test_replay.py \
              2>&1 | tee "$OUT/tests_log.txt"
            timeout 300 python bench/diag_step_kernels.py --configs 4:131072:1 4:16384:1 3:16384:1:64 4:131072:8 \
              --variants --out "$OUT/step_variants.json" 2>&1 | tee "$OUT/step_variants_log.txt" ;;
  d256)     timeout 240 python bench/diag_step_kernels.py --configs 2:16384:1:256 2:32768:1:256 2:131072:1:256 \
              --variants --out "$OUT/step_variants_d256.json" 2>&1 | tee "$OUT/step_variants_d256_log.txt" ;;
  loop256)  timeout 300 python bench/bench_decode_loop.py --n 16384 131072 --dims 256 --batch 1 8 --reps 3 \
              --out "$OUT/decode_loop_d256.json" 2>&1 | tee "$OUT/decode_loop_d256_log.txt"
            timeout 120 python -m pytest -q -p no:cacheprovider tests/kernels/test_decode_step.py 2>&1 \
              | tee "$OUT/tests_log.txt" ;;
  form)     timeout 200 python bench/diag_step_kernels.py --configs 3:16384:1:64 3:32768:1:64 3:131072:1:64 \
              3:16384:8:64 3:131072:8:64 4:32768:1 4:16384:8 --variants --out "$OUT/step_variants.json" 2>&1 \
              | tee "$OUT/step_variants_log.txt"
            timeout 340 python -m pytest -v --tb=short -p no:cacheprovider tests/kernels/test_decode_step.py \
              tests/kernels/test_replay.py 2>&1 | tee "$OUT/tests_log.txt" ;;
  topk)     timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_code_topk.py \
              tests/kernels/test_decode_step.py 2>&1 | tee "$OUT/tests_log.txt"
            timeout 380 python bench/bench_topk_step.py --dims 128 64 --n 16384 131072 32768 --batch 1 8 \
              --out "$OUT/topk_step.json" 2>&1 | tee "$OUT/topk_step_log.txt" ;;
  topkprof) timeout 100 python -m pytest -q -p no:cacheprovider tests/kernels/test_code_topk.py 2>&1 | tee "$OUT/tests_log.txt"
            timeout 200 python bench/diag_topk.py --profile --configs 128:131072:1 128:131072:8 64:16384:1 128:32768:1 \
              --out "$OUT/topk_diag.json" 2>&1 | tee "$OUT/topk_diag_log.txt" ;;
  topkshare) timeout 100 python -m pytest -q -p no:cacheprovider tests/kernels/test_code_topk.py 2>&1 | tee "$OUT/tests_log.txt"
            for top in 0.0001 0.1; do
              timeout 80 python bench/diag_topk.py --profile --configs 128:131072:1 --top $top \
                --out "$OUT/topk_diag_top$top.json" 2>&1 | tee "$OUT/topk_diag_top${top}_log.txt"
            done ;;
  gather)   timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_code_topk.py 2>&1 | tee "$OUT/tests_log.txt"
            timeout 330 python bench/diag_topk.py --profile --configs 128:131072:1 128:16384:1 64:16384:1 128:131072:8 \
              --out "$OUT/topk_diag.json" 2>&1 | tee "$OUT/topk_diag_log.txt" ;;
  gatherloop) timeout 110 python -m pytest -q -p no:cacheprovider tests/kernels/test_code_topk.py 2>&1 | tee "$OUT/tests_log.txt"
            timeout 470 python bench/bench_topk_step.py --dims 128 64 --n 16384 131072 32768 --batch 1 8 \
              --out "$OUT/topk_step.json" 2>&1 | tee "$OUT/topk_step_log.txt" ;;
  select)   timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_select.py tests/kernels/test_code_topk.py \
              2>&1 | tee "$OUT/tests_log.txt"
            timeout 420 python bench/diag_topk.py --profile --configs ${CONFIGS:-128:131072:1 128:131072:8 64:16384:1 128:16384:8} \
              --out "$OUT/topk_diag.json" 2>&1 | tee "$OUT/topk_diag_log.txt" ;;
  selectloop) timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_select.py tests/kernels/test_code_topk.py \
              2>&1 | tee "$OUT/tests_log.txt"
            timeout 380 python bench/bench_topk_step.py --dims 128 64 --n 16384 131072 32768 --batch 1 8 \
              --out "$OUT/topk_step.json" 2>&1 | tee "$OUT/topk_step_log.txt" ;;
  loop128)  timeout 560 python bench/bench_decode_loop.py --n 16384 32768 --dims 128 --batch 1 --reps 3 \
              --out "$OUT/decode_loop.json" 2>&1 | tee "$OUT/decode_loop_log.txt" ;;
  loop)     timeout 400 python bench/bench_decode_loop.py --n 131072 16384 32768 --dims 128 64 --batch 1 8 --reps 3 \
              --out "$OUT/decode_loop.json" 2>&1 | tee "$OUT/decode_loop_log.txt" ;;
  ncu)      NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
            echo "ncu: ${NCU:-none}" | tee "$OUT/ncu_log.txt"
            [ -n "$NCU" ] || exit 0
            for cfg in 4:131072:1 4:16384:1; do
              timeout 250 "$NCU" --launch-skip 9 --launch-count 3 -k regex:"_prepare_kernel|_code_filter_kernel|_merge_kernel" \
                --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
                --section SchedulerStats --section WarpStateStats --section SourceCounters \
                python bench/profile_step_ncu.py --config $cfg > "$OUT/ncu_step_${cfg//:/_}.txt" 2>&1
              tail -5 "$OUT/ncu_step_${cfg//:/_}.txt" | tee -a "$OUT/ncu_log.txt"
            done ;;
  full)     FILES="tests/kernels tests/integrations/test_device_cache.py tests/distributed tests/attention/test_power.py
              tests/test_protocols.py tests/test_docs.py"
            if python -c "import xdist" 2>/dev/null; then
              timeout ${TESTS_TIMEOUT:-560} python -m pytest -q -p no:cacheprovider -n 12 --dist load $FILES > "$OUT/full_tests.txt" 2>&1
              echo "pytest exit $?" >> "$OUT/full_tests.txt"
            else  # by hand: the longest file alone, the rest in groups
              i=0
              for g in "tests/kernels/test_decode_step.py" "tests/kernels/test_block_sparse.py tests/kernels/test_blockmask.py" \
                  "tests/kernels/test_search.py tests/kernels/test_search_plan.py tests/kernels/test_validation.py tests/kernels/test_selected.py" \
                  "tests/kernels/test_replay.py tests/integrations/test_device_cache.py tests/kernels/test_dispatch.py" \
                  "tests/kernels/test_prefill.py tests/kernels/test_relu_prefill.py tests/kernels/test_relu_scaling.py" \
                  "tests/kernels/test_code_topk.py tests/kernels/test_select.py tests/kernels/test_codes.py tests/kernels/test_sm90_compile.py" \
                  "tests/distributed tests/kernels/test_fuzz.py tests/kernels/test_compile.py" \
                  "tests/attention/test_power.py tests/test_protocols.py tests/test_docs.py"; do
                (timeout ${TESTS_TIMEOUT:-560} python -m pytest -q -p no:cacheprovider $g > "$OUT/part_$i.txt" 2>&1; echo "pytest exit $? ($g)" >> "$OUT/part_$i.txt") &
                i=$((i + 1))
              done
              wait
              cat "$OUT"/part_*.txt > "$OUT/full_tests.txt"; rm -f "$OUT"/part_*.txt
            fi
            grep -E "passed|failed|pytest exit" "$OUT/full_tests.txt" ;;
  kernels)  timeout 130 python bench/diag_step_kernels.py --sweep --out "$OUT/step_kernels.json" 2>&1 | tee "$OUT/step_kernels_log.txt" ;;
  owed)     OUT=$OUT bash bench/run_gpu_pending.sh kernels; OUT=$OUT bash bench/run_gpu_pending.sh count ;;
  *) echo "usage: $0 full|decode|faiss|generate|striped|tests|eager|replay|b8|eps|count|kernels|owed|ride|form|loop|loop128|topk|topkprof|topkshare|gather|gatherloop|select|selectloop|d256|loop256|pdl|ncu|prepare|ceiling"; exit 2 ;;
esac
