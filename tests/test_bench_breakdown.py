"""The whole-model time breakdown (``bench.breakdown``): CUDA kernel names sorted into categories as the
profiler reports them on an H200 (names copied from torch 2.11 profiles), and the Amdahl arithmetic."""

from __future__ import annotations

import math

import pytest

from comfyquant.bench import breakdown as bd

NAMES = {
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "linear",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off": "linear",
    "w8a8_tma_persistent": "linear",
    "w8a16": "linear",
    "fused": "linear",
    "_act_tile_kernel": "act_quant",
    "_act_kernel": "act_quant",
    "flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>": "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
    "_attn_int8": "attention",
    "_attn_quant_blocks": "attention",
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "other",
    "triton_per_fused_native_layer_norm_0": "other",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, true>": "other",
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_category(name: str) -> None:
    assert bd.category(name) == NAMES[name]


def test_summarize_and_ceilings() -> None:
    # two forwards: per forward linear 300 µs, attention 100, other 50 (bf16); quantized linears 150 + quant 30
    base = bd.summarize([("nvjet_a", 400.0), ("nvjet_b", 200.0), ("flash_fwd_kernel", 200.0),
                         ("elementwise", 100.0)], forwards=2, wall_us=500.0)
    assert base.us == {"linear": 300.0, "act_quant": 0.0, "attention": 100.0, "other": 50.0}
    assert base.gpu_us == 450.0 and base.host_gap_us == 50.0
    assert base.top[0] == ("nvjet_a", 200.0)
    quant = bd.summarize([("w8a8_tma", 300.0), ("_act_tile_kernel", 60.0), ("flash_fwd_kernel", 200.0),
                          ("elementwise", 100.0)], forwards=2)
    assert math.isclose(bd.linear_speedup(base, quant), 300.0 / 180.0)
    # 2x linears: 450 / (150 + 150); linears infinitely fast would give 450 / 150
    assert math.isclose(bd.ceiling(base, 2.0), 1.5)
    assert math.isclose(bd.ceiling(base, 1.6), 450.0 / (150.0 + 300.0 / 1.6))
    table = bd.markdown([{"model": "m", "variant": "bf16", "breakdown": base, "ceil_1.6": 1.3, "ceil_2": 1.5}])
    assert "| m | bf16 | 500 | 450 | 300 | 0 | 100 | 50 | - | 1.30 | 1.50 |" in table
