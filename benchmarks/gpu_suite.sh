#!/usr/bin/env bash
# One GPU session's benchmark set: every number docs/benchmarks.md needs from an H100/H200,
# plus the bf16/cuDNN correctness checks, in one run (about 6-8 minutes on one H100).
#
#   bash benchmarks/gpu_suite.sh [OUTDIR]     # from the repository root, jaxdiff installed
#
# Each step writes its table (.txt) and rows (.json) into OUTDIR (default: bench-gpu/).
# Steps are independent: one that fails is reported and the rest still run. Each model
# runs in its own process, so the allocator's peak memory is that model's.
set -u
out="${1:-bench-gpu}"
mkdir -p "$out"
status=0

run() {  # run NAME CMD...: tee the output to OUTDIR/NAME.txt, keep going on failure
  local name="$1"
  shift
  echo "=== $name: $*"
  if ! timeout 900 "$@" > "$out/$name.txt" 2>&1; then
    echo "FAILED: $name (see $out/$name.txt)"
    status=1
  fi
  tail -n 25 "$out/$name.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python -c "import jax, flax; print(jax.__version__, flax.__version__, jax.devices())" \
  >> "$out/gpu.txt" 2>&1

# bf16 and cuDNN attention compute what float32/XLA compute (the tests that need a GPU
# skip themselves elsewhere); parity of the published-weight goldens on GPU.
run gpu_tests python -m pytest -q -p no:cacheprovider tests/test_gpu_numerics.py \
  tests/test_pretrained_dit.py tests/test_models_fastpaths.py

run train_dit_b2 python -m benchmarks.train_step --model dit-B/2 --batch 256 --precision bf16 \
  --matmul-ceiling --compare-scan --json "$out/train_dit_b2.json"
run train_dit_s2 python -m benchmarks.train_step --model dit-S/2 --batch 256 --precision bf16 \
  --json "$out/train_dit_s2.json"
run train_unet python -m benchmarks.train_step --model unet --batch 512 --precision bf16 \
  --json "$out/train_unet.json"
run train_dit_b2_remat python -m benchmarks.train_step --model dit-B/2 --batch 256 \
  --precision bf16 --remat dots --json "$out/train_dit_b2_remat.json"
run compile python -m benchmarks.compile_time --model dit-XL/2,unet --batch 256 \
  --precision bf16 --json "$out/compile.json"
run sampling_unet python -m benchmarks.sampling --model unet --batches 1,64,1024 \
  --guidance-batch 64 --precision bf16 --json "$out/sampling_unet.json"

# XLA flags to A/B on the headline step (documented only if they help).
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true" run flag_lhs \
  python -m benchmarks.train_step --model dit-B/2 --batch 256 --precision bf16 --steps 10
XLA_FLAGS="--xla_gpu_triton_gemm_any=true" run flag_triton \
  python -m benchmarks.train_step --model dit-B/2 --batch 256 --precision bf16 --steps 10
exit $status
