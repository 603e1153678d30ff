#!/usr/bin/env bash
# Our CPU int8 and gated-MLP paths again, on an emulated CPU without VNNI or AVX-512 (oneDNN and ATen capped to
# AVX2, as on AMD Zen 2-3): there torch._int_mm sums wrong and ATen's vector paths round differently. About 80
# seconds on 2 cores; scripts/test.sh runs it after the main pass. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
# inductor's on-disk cache does not key on the vector ISA, so code compiled by the uncapped pass would come back
# wrong here (docs/KERNEL_NOTES.md): this pass compiles into a cache of its own
export TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/torchinductor_$(id -u)_avx2"
# the runtime's kernels, layers, folds and auto precision; the node pack in ComfyUI's classes; files converted and
# run through ComfyUI. Tests that check stock ComfyUI's own CPU int8 layers meet the same oneDNN bug upstream and
# are marked stock_comfy_int8_cpu (pyproject.toml); -m leaves them out.
exec .venv/bin/python -m pytest -q -m "not stock_comfy_int8_cpu" \
  tests/test_kernels_cpu.py tests/test_int4_dispatch.py tests/test_kernel_table.py tests/test_dispatch_low_rank.py \
  tests/test_runtime_quantize.py tests/test_runtime_tensor.py tests/test_runtime_loader.py tests/test_plain_calls.py \
  tests/test_runtime_gated.py tests/test_runtime_norms.py tests/test_runtime_fold.py tests/test_siblings.py \
  tests/test_lora_live.py tests/test_autoprec_eval.py tests/test_autoprec_convert.py \
  tests/test_nodes_adapter.py tests/test_nodes_clip.py tests/test_nodes_dit_blocks.py tests/test_nodes_unet_blocks.py \
  tests/test_nodes_wan_blocks.py tests/test_nodes_lora.py tests/test_nodes_auto.py tests/test_nodes_smoothquant.py \
  tests/test_nodes_attention.py tests/test_eval_comfyui_flux.py tests/test_convrot.py tests/test_lora_merge.py "$@"
