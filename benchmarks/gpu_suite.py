"""Every GPU benchmark of the project in one time-boxed call (one lease of a device machine is short).

Each step is one benchmark script run as its own process under its own time limit, so a crash or a hang in
one step costs that step only. Logs and result files go under a scratch folder, zipped after every step into
``--out``/results.zip (a device call returns few files; a call cut off by its time limit still returns the steps
that finished; a second call with the same ``--out`` writes results-2.zip); ``--out``/summary.txt holds each
step's exit status, time and the tail of its output, written as each step ends.

    python3 benchmarks/gpu_suite.py --out $OUT --steps kernels:150,sweep:100,lora:45,optimizers:80,comfyui:120
    python3 benchmarks/gpu_suite.py --out /tmp/s --smoke        # CPU: every step in its smoke mode

Before the steps it unpacks what the device machine cannot download (files under the ignored ``.whl/``):
comfy-kitchen's CUDA wheel repacked without its ROCm library (``ck.zip``), a copy of the ComfyUI 0.30.0 test
cache (``comfyui.zip``), and wheels of ComfyUI's small pure dependencies (``wheels/``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def steps(work: Path, smoke: bool, comfy_cache: Path | None) -> dict[str, list[list[str]]]:
    """Step name -> the commands it runs, in order (paths under ``work``)."""
    s = ["--smoke"] if smoke else []
    cache = ["--comfyui-cache", str(comfy_cache)] if comfy_cache else []
    return {
        "kernels": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "kernels"), "--budget-s", "{budget}",
                     "--sections", "check,calibrate,host,rotation,models"]],
        # whole models alone (a short call): the device's costs, the activation kernels, the model table
        "models": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "kernels"), "--budget-s", "{budget}",
                    "--sections", "calibrate,rotation,models",
                    "--models", "sdxl_1024,t5xxl_256,qwen3_4b_256,flux_512,flux_1024,flux2_1024,wan_480p"]],
        # the two large whole models alone (the kernels' share of step time is largest there)
        "models_large": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "kernels"), "--budget-s", "{budget}",
                          "--sections", "calibrate,rotation,models", "--models", "flux_1024,wan_480p"]],
        # Wan 2.x 480p alone: its variants, with int8 attention on its 32K-token self-attention ("int8_attn")
        "models_wan": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "kernels"), "--budget-s", "{budget}",
                        "--sections", "models", "--models", "wan_480p"]],
        # a short call for host-time changes: the checks, host per call, and the host-bound models
        "hostbound": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "kernels"), "--budget-s", "{budget}",
                       "--sections", "check,calibrate,host,models", "--models", "t5xxl_256,sdxl_1024,flux_512"]],
        # the same without the kernel checks (run them in a step of their own)
        "hostbound_models": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "kernels"), "--budget-s",
                              "{budget}", "--sections", "calibrate,host,models", "--models",
                              "t5xxl_256,sdxl_1024,flux_512"]],
        # GPU kernel time per category of bf16 / int8 / fp8 whole models, and the Amdahl ceilings it implies
        "breakdown": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "breakdown"), "--budget-s", "{budget}",
                       "--sections", "breakdown"]],
        # attention alone: SDPA's backends against the int8 attention kernel's tiles, the models' shapes
        "attention": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "attention"), "--budget-s", "{budget}",
                       "--sections", "attention"]],
        "sweep": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "sweep"), "--budget-s", "{budget}",
                   "--sections", "sweep"]],
        # the sweep's SDXL / T5 / CLIP rows alone (a short call; Flux / Wan take the other ~60% of the sweep)
        # each sweep column's CUDA kernels, GPU time and runtime calls per call (where a column's time goes)
        "profile_layers": [[PY, "benchmarks/profile_layers.py", "--out", str(work / "profile")]],
        # the long-K rows where the sweep's convrot column ran +113 µs over the plain layer (run 83) against
        # bench_rotation's +57 µs for the whole rotating pass (run 55): which kernels, at what time
        "profile_convrot": [[PY, "benchmarks/profile_layers.py", "--out", str(work / "profile_convrot"), "--shapes",
                             "flux.mlp2,flux.linear2,wan14b.ffn2", "--m", "4096"]],
        # the 3,072-column rows at 16,384 where convrot's gap to the plain layer is mostly not its rotating pass
        "profile_convrot_16k": [[PY, "benchmarks/profile_layers.py", "--out", str(work / "profile_convrot_16k"),
                                 "--shapes", "flux.linear1,flux.mlp0,flux.qkv", "--m", "16384"]],
        # eager host µs per call by shape beside the dispatch calibration's one-shape figure (runs 130-131)
        "host_floor": [[PY, "benchmarks/probe_host_floor.py", "--out", str(work / "host_floor")]],
        # the Flux / Wan rows at 16,384 alone (the convrot column against the plain one)
        "sweep_16k": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "sweep"), "--budget-s", "{budget}",
                       "--sections", "sweep", "--sweep-models", "flux,wan14b", "--sweep-m", "16384"]],
        # the Flux / Wan rows at 4,096 and 16,384 alone: the 18 rows of the W8A8 / FP8 >= 1.6x and convrot targets
        "sweep_dit": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "sweep"), "--budget-s", "{budget}",
                       "--sections", "sweep", "--sweep-models", "flux,wan14b", "--sweep-m", "4096,16384"]],
        "sweep_narrow": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "sweep"), "--budget-s", "{budget}",
                          "--sections", "sweep", "--sweep-models", "sdxl,t5xxl,clip_l"]],
        # the SDXL / CLIP rows at 1,024-16,384 alone: where the resident kernel is priced (K <= 768) and beside it
        "sweep_resident": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "sweep"), "--budget-s", "{budget}",
                            "--sections", "sweep", "--sweep-models", "sdxl,clip_l", "--sweep-m", "1024,4096,16384"]],
        # tile-config timings (GEMM alone, CUDA graphs): the data behind configs.py, SDXL's 1280-wide shapes too
        "tune": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "tune"), "--budget-s", "{budget}",
                  "--sections", "tune"]],
        # the W8A8 GEMM on a persistent grid against the per-tile kernel and bf16 (Flux / Wan shapes, M >= 1024)
        "persist": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "tune"), "--budget-s", "{budget}",
                     "--sections", "persist"]],
        # the GPU kernel checks alone (accuracy of every kernel and plan; a failed check fails the step): the whole
        # list took 311 s warm-ish (run 74) and more than 400 s from a cold start (run 77); checks_a + checks_b
        # split it in two calls' worth
        "checks": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels")]],
        "checks_a": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels_a"), "--only",
                      "check_act_quant,check_held_rotation,check_group_rows,check_int_mm_exact,check_persistent,"
                      "check_ws_gemm,check_ws_lora_wired,check_linear,check_fused_rows,check_fp8_triton,check_fp8_low_rank_choice,"
                      "check_block,check_w4a8"]],
        "checks_b": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels_b"), "--only",
                      "check_low_rank_epilogue,check_input_act,check_plans,check_cuda_graphs,check_inference_mode,"
                      "check_attention,check_attention_cudnn,check_ws_fp8,check_ws_experimental,check_siblings,"
                      "check_norm_fold,check_modulated_fold,check_layer_norm_fold,check_call_norms"]],
        # the twenty-fifth session's host-time changes (dispatch.capturing's stream-handle read, plans' allocations,
        # the int8 attention's): capture and replay, eager plans bit for bit, fused siblings, the attention kernel
        "checks_capture": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                            "check_cuda_graphs,check_plans,check_siblings,check_attention"]],
        # the folded RMSNorm and column scale (runtime.norms, acts.RowNorm) alone
        "checks_norm": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                         "check_norm_fold,check_siblings"]],
        # the same with the activation kernels' checks and the plans' (the rotating row kernel's norm, 2026-12-04)
        "checks_norm_act": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                             "check_norm_fold,check_act_quant,check_plans"]],
        # the modulated LayerNorm folded into the quantizer (nodes.flux_blocks, 2026-12-04, not yet run on a GPU),
        # and the affine LayerNorm as one shared row of it (runtime.norms: CLIP, the bench SDXL block, 2026-12-05):
        # its checks, then its bench (quantizer and whole layer against layer_norm + addcmul first)
        "checks_modulated": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                              "check_modulated_fold,check_layer_norm_fold,check_norm_fold,check_call_norms"]],
        "modulated_fold": [[PY, "benchmarks/bench_modulated_fold.py", "--out", str(work / "kernels")]],
        # the Python part of the eager host time (kernel launches stubbed) on the device's own host: the DiT norm
        # site, the node layer and a sibling group against their alternatives (CPU figures 2026-12-05)
        "host_python": [[PY, "benchmarks/host_python.py", "--json", str(work / "kernels" / "host_python.json")]],
        # the norm folded into the quantizer against the norm in torch first, the quantizer alone (rotated too)
        "norm_fold": [[PY, "benchmarks/bench_norm_fold.py", "--out", str(work / "kernels")]],
        # the text encoders alone (T5-XXL-, Qwen3-4B- and Gemma-3-12B-shaped at 256 tokens, CLIP-L at 77: every
        # variant, int8-rot's too; Gemma's 1 + weight norms fold since 2026-12-04, CLIP's LayerNorms since 12-05)
        "encoders": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "kernels"), "--budget-s", "{budget}",
                      "--sections", "calibrate,models", "--models",
                      "t5xxl_256,qwen3_4b_256,gemma3_12b_256,clip_l_77"]],
        # the SDXL and CLIP rows alone (where the narrow layers' misses are; T5's rows take the narrow sweep's rest)
        "sweep_sdxl_clip": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "sweep"), "--budget-s", "{budget}",
                             "--sections", "sweep", "--sweep-models", "sdxl,clip_l"]],
        # the SDXL / CLIP rows at 1 and 16 rows (where the one-launch kernel's thin tiles were mispriced)
        "sweep_narrow_small_m": [[PY, "benchmarks/gpu_session.py", "--out", str(work / "sweep"), "--budget-s",
                                  "{budget}", "--sections", "sweep", "--sweep-models", "sdxl,clip_l", "--sweep-m",
                                  "1,16"]],
        # the checks of the W8A8 GEMM paths and plans and of the attention backend order only (a short call)
        "checks_gemm": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                         "check_persistent,check_ws_gemm,check_ws_lora_wired,check_plans,check_attention_cudnn,"
                         "check_fp8_triton,check_ws_fp8,check_ws_experimental,check_siblings"]],
        # sibling projections as one GEMM (runtime.siblings) against the unfused module, eager and graph-captured
        "checks_siblings": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                             "check_siblings"]],
        # the warp-specialized Gluon W8A8 GEMM against today's Triton kernel and cuBLAS (GEMM alone; Hopper only)
        "gemm_ws": [[PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_ws")]],
        # the same with the Gluon kernel's unpicked variants (fp8 operands, ping-pong): put it last in a call
        "gemm_ws_exp": [[PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_ws"), "--experimental",
                         "--m", "4608,16384"]],
        # fp8 on the Gluon kernel (configs.WS_FP8) against cuBLAS fp8, GEMM alone and whole layers, at the issue's
        # M >= 4096 rows and at 1,024 (Flux / Wan shapes)
        "gemm_fp8": [[PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_fp8"), "--experimental",
                      "--m", "1024,4096,16384", "--reps", "40"]],
        # the same on SDXL / CLIP / T5 widths, where the runtime keeps the Triton kernels until this is timed
        "gemm_ws_narrow": [[PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_ws_narrow"), "--narrow",
                            "--m", "1024,4096,16384", "--reps", "30"]],
        # the same as GPU time (CUDA-graph replays): the small shapes' plain timing is the launchers' host time
        "gemm_ws_narrow_graph": [[PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_ws_narrow_graph"),
                                  "--narrow", "--graph", "--m", "1024,4096,16384", "--reps", "30"]],
        # below WS_MIN_M as GPU time: whether the Gluon kernel should start under 1,024 rows (M = 256 rows of the
        # sweep are GPU-bound at 0.73-0.90x on Flux / Wan / T5 on the Triton kernel)
        "gemm_ws_small_m": [[PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_ws_small_m"), "--graph",
                             "--m", "256,512,1024", "--reps", "30"]],
        # 128x64 Gluon tiles from 1,024 rows where 128x128 ones fill under two waves (configs.ws_config takes them
        # below 1,024 rows only; run 31 timed them there alone): Flux proj / mlp2 / linear2 at 1,024 rows, SDXL attn
        # 640 and CLIP fc1 / fc2 at 1,024 and 4,096 (CLIP fc2 at 4,096: 192 tiles, 1.45 waves, 0.75x bf16 eager)
        "gemm_n64": [[PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_n64"), "--graph", "--m", "1024",
                      "--only", "flux.proj,flux.mlp2,flux.linear2", "--reps", "30"],
                     [PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_n64_narrow"), "--narrow", "--graph",
                      "--m", "1024,4096", "--only", "sdxl.attn640,clip_l.mlp0,clip_l.mlp2", "--reps", "30"]],
        # the same on the T5 / SDXL widths that have >= 64 tiles of 128x128 at 512 rows
        "gemm_ws_small_m_narrow": [[PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_ws_small_m_narrow"),
                                    "--graph", "--narrow", "--m", "256,512", "--reps", "30", "--only",
                                    "t5xxl.ffn0,t5xxl.ffn2,sdxl.ff0,sdxl.ff2"]],
        # the W8A8 rows: M 4096 / 16384, the whole layer (activation pass + picked GEMM) included
        "gemm_layers": [[PY, "benchmarks/bench_gemm_ws.py", "--out", str(work / "gemm_ws"), "--m", "4096,16384",
                         "--reps", "40"]],
        # the activation quantizer alone: row / tile kernels against the block kernel's configurations (GPU time)
        "act_quant": [[PY, "benchmarks/bench_act_quant.py", "--out", str(work / "act_quant")]],
        # the same on widths run 35 did not time (SDXL's 640, Wan's 13,824)
        "act_quant_more": [[PY, "benchmarks/bench_act_quant.py", "--out", str(work / "act_quant_more"), "--k",
                            "640,13824"]],
        # Wan's 13,824 against 12,288 / 15,360 at the rows its layers run: run 127 (H100) read the block kernel's
        # pick 2.2 TB/s at 16,384 x 13,824 (2.9 at the others), slower than the rotating pass on the same rows
        "act_quant_wide": [[PY, "benchmarks/bench_act_quant.py", "--out", str(work / "act_quant_wide"), "--k",
                            "13824,12288", "--m", "4096,16384"]],
        # fp32 rows (ComfyUI's text encoders), the picked configuration only against the row kernel
        "act_quant_fp32": [[PY, "benchmarks/bench_act_quant.py", "--out", str(work / "act_quant_fp32"), "--dtype",
                            "fp32", "--configs", "picked", "--k", "768,1280,3072,4096,5120,10240"]],
        # the rotating activation kernel's launch configurations (convrot 256) against the row kernel and "auto"
        "rotation_tiles": [[PY, "benchmarks/bench_rotation.py", "--out", str(work / "rotation_tiles")]],
        # its split form (two launches over column chunks) where rows are too few for it, against the row kernel
        "rotation_split": [[PY, "benchmarks/bench_rotation.py", "--out", str(work / "rotation_split"), "--split"]],
        # the tile kernel's codes pass from the row's end against forward (its re-read from L2, not HBM?)
        "rotation_back": [[PY, "benchmarks/bench_rotation.py", "--out", str(work / "rotation_back"), "--back"]],
        # the one-read rotating kernel (its chunk held in registers, row blocks synchronized) in its configurations
        # against the tile kernel, the row kernel, "auto" and the unrotated pass, M 64 .. 16,384 (GPU time)
        "rotation_held": [[PY, "benchmarks/bench_rotation.py", "--out", str(work / "rotation_held"), "--held"]],
        # its GPU checks (bit-equal to the tile kernel, counters, float64) and the paths that run convrot layers
        "checks_held": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                         "check_held_rotation,check_act_quant,check_linear,check_plans,check_cuda_graphs"]],
        # the group-rows rotating kernel (a row per program, x read once up to 16,384 columns, 2026-12-06): its
        # GPU checks with the paths that run convrot layers, then its configurations against the tile / one-read
        # kernels and the unrotated pass, M 1,024 .. 16,384 on Flux / Wan widths (GPU time)
        "checks_grows": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                          "check_group_rows,check_held_rotation,check_linear,check_plans,check_cuda_graphs"]],
        "rotation_grows": [[PY, "benchmarks/bench_rotation.py", "--out", str(work / "rotation_grows"), "--grows"]],
        # the resident one-launch W8A8 kernel (gluon_resident; `auto` takes it up to K = 768) on SDXL / CLIP's layers:
        # bit-equal to the two-launch path, then timed against bf16, the runtime's pick and the pinned one-launch
        # path, with its alternative configurations (saved after every shape: a step cut short keeps what it timed)
        "resident": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels_resident"), "--only",
                      "check_resident"],
                     [PY, "benchmarks/bench_resident.py", "--out", str(work / "resident"), "--configs", "--m",
                      "1024,4096,16384", "--shapes", "sdxl.attn640,clip.attn,sdxl.attn1280,clip.fc2,clip.fc1"]],
        # the warp-specialized resident kernel (gluon_resident_ws, never run on a GPU before): its bit-equality
        # check (opt-in: named here only), then its GPU time beside the resident kernel's on the narrow attention
        # (SDXL 640 / 1,280, CLIP) and CLIP fc1 (0.89-0.92x bf16 at 1,024 rows in runs 141-142), its default launch
        # and the others (tile width, splits) each checked and timed; the shapes' results are written one by one
        "resident_ws": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels_resident_ws"), "--only",
                         "check_resident_ws"],
                        [PY, "benchmarks/bench_resident.py", "--out", str(work / "resident_ws"), "--ws",
                         "--ws-configs", "--m", "1024,4096,16384", "--shapes",
                         "sdxl.attn640,clip.attn,sdxl.attn1280,clip.fc1"]],
        # the W4A8 GEMM's kernels (plain order, the weight as wgmma's register operand, both nibbles per MMA, the
        # warp-specialized Gluon kernel) on 12 tiles against cuBLAS bf16 and the int8 W8A8 GEMM, GPU time, each
        # checked against a float64 product before it is timed, bit-equality across all (run 67: joined on
        # 64-weight-row tiles 0.65-1.05x bf16 from 256 rows, about half the int8 GEMM)
        "w4a8": [[PY, "benchmarks/bench_w4a8.py", "--out", str(work / "w4a8"), "--budget-s", "{budget}"]],
        # the weight-only GEMM at M = 1 / 16 with split K against unsplit and cuBLAS bf16 (thin-M down projections)
        "w8a16_split": [[PY, "benchmarks/bench_w8a16_split.py", "--out", str(work / "w8a16_split")]],
        # fp8 weight-only on the >= 8,192-wide layers at M = 1 / 16 (run 53: 0.72-0.97x bf16 on the unsplit
        # 128-column tiles, int8 1.14-1.45x): which tile / split, against cuBLAS fp8
        "w8a16_fp8_wide": [[PY, "benchmarks/bench_w8a16_split.py", "--out", str(work / "w8a16_split"), "--fp8",
                            "--wide"]],
        # int4_rot's packed weight-only path at 1 / 16 rows: its tiles and K slices, wide and narrow layers
        "w8a16_int4": [[PY, "benchmarks/bench_w8a16_split.py", "--out", str(work / "w8a16_split"), "--int4"],
                       [PY, "benchmarks/bench_w8a16_split.py", "--out", str(work / "w8a16_split"), "--int4",
                        "--wide"]],
        # the weight-only GEMM's tiles at 256-16,384 rows of the narrow layers every W8A8 path loses (no activation
        # pass, one launch): today's thin-M config against wider tiles and cuBLAS bf16
        "w8a16_large_m": [[PY, "benchmarks/bench_w8a16_large_m.py", "--out", str(work / "w8a16_large_m")]],
        # the weight-only kernel's main loop on bf16 weights (a dense copy in one Triton launch) against cuBLAS
        "w8a16_dense": [[PY, "benchmarks/bench_w8a16_large_m.py", "--out", str(work / "w8a16_dense"), "--dense"]],
        # TMA-fed experimental GEMMs (dense, weight-only both operand orders) on the same narrow shapes, GPU time
        "tma_probe": [[PY, "benchmarks/tma_weight_only_probe.py", "--out", str(work / "tma_probe")]],
        # the one-launch W8A8 path from 64 rows (row-block kernel) against two launches and bf16 on 640-4,096-wide
        # layers: eager wall, GPU time, tile configurations, bit-equality with the two-launch path
        "fused_rows": [[PY, "benchmarks/bench_fused_rows.py", "--out", str(work / "fused_rows"), "--budget-s",
                        "{budget}"]],
        # ... on the layers wider than a row block's 32 quantizing programs (configs.ROWS_WIDE, off until timed):
        # its GPU checks (bit-equal to two launches, four streams at once), then the bench
        "fused_rows_wide": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                             "check_fused_rows"],
                            [PY, "benchmarks/bench_fused_rows.py", "--out", str(work / "fused_rows"), "--wide",
                             "--budget-s", "{budget}"]],
        # the GPU checks of the weight-only GEMM's paths (split K at M <= 16): linears, plans, graphs, low-rank terms
        "checks_split": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                          "check_linear,check_plans,check_cuda_graphs,check_low_rank_epilogue,check_fp8_triton,"
                          "check_siblings"]],
        # the GPU checks of the rotating activation kernels (convrot, W4A8) and the one-launch W8A8 kernel
        "checks_rot": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                        "check_act_quant,check_linear,check_fused_rows,check_w4a8,check_low_rank_epilogue,"
                        "check_input_act"]],
        # the GPU checks of the activation kernels and of the paths that run them (linears, plans, fusions)
        "checks_act": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                        "check_act_quant,check_linear,check_input_act,check_plans,check_fp8_triton,"
                        "check_cuda_graphs"]],
        "lora": [[PY, "benchmarks/bench_lora.py", "--out", str(work / "lora"), *s]],
        # the Wan self-attention alone, int8, as is and with q / k / v fused (a short call: sibling groups' LoRAs)
        "lora_siblings": [[PY, "benchmarks/bench_lora.py", "--out", str(work / "lora"), "--only", "wan self-attention",
                           "--formats", "int8", *(s or ["--ranks", "16", "32"])]],
        "optimizers": [[PY, "benchmarks/bench_optimizers.py", "--workdir", str(work / "opt_tmp"), "--json",
                        str(work / "optimizers" / "bench_optimizers.json"),
                        *(s or ["--blocks", "3", "--methods", "rtn,gptq,quip,learned"])]],
        # the peer's default (learned rounding) on the same 3+3-block file, from carried wheels (.whl/wheels)
        "optimizers_peer": [[PY, "benchmarks/bench_optimizers.py", "--workdir", str(work / "opt_tmp"), "--json",
                             str(work / "optimizers" / "bench_optimizers_peer.json"),
                             *(s or ["--blocks", "3", "--methods", "rtn", "--peer", "--peer-here"])]],
        # the whole Flux.1-dev-shaped checkpoint (12B; ~24 GB written first), GPTQ only: issue 9's cost target
        "optimizers_full": [[PY, "benchmarks/bench_optimizers.py", "--workdir", str(work / "opt_tmp"), "--json",
                             str(work / "optimizers" / "bench_optimizers_full.json"), *(s or ["--methods", "gptq"])]],
        "comfyui": [[PY, "benchmarks/bench_comfyui_flux.py", "--out", str(work / "comfyui"), *cache, *s]],
        # the same, 3 rounds of all variants pooled (a noisy host's slow phases spread over every variant)
        # the node's cuda_graphs option in ComfyUI's Flux class (every variant through apply_model), 2 rounds
        "comfyui_graphs": [[PY, "benchmarks/bench_comfyui_flux.py", "--out", str(work / "comfyui_graphs"), *cache, *(s or [
            "--graphs", "--rounds", "2", "--iters", "5", "--warmup", "3", "--only",
            "bf16 + cuda graphs,adapter int8,adapter int8 + cuda graphs,adapter int8 + attention cudnn + cuda graphs"
        ])]],
        "comfyui_rounds": [[PY, "benchmarks/bench_comfyui_flux.py", "--out", str(work / "comfyui"), *cache,
                            *(s or ["--rounds", "3", "--iters", "4", "--warmup", "2"])]],
        # eager 512² (host-bound) in ComfyUI's Flux class, 3 pooled rounds of the variants that decide its target
        "comfyui_512": [[PY, "benchmarks/bench_comfyui_flux.py", "--out", str(work / "comfyui"), *cache, *(s or [
            "--resolutions", "512", "--rounds", "3", "--iters", "6", "--warmup", "3", "--only",
            "bf16 + attention cudnn,adapter int8,adapter int8 + attention cudnn,ComfyUI int8 (same file)"])]],
        # the modulated-LayerNorm fold (nodes.flux_blocks) against the norms in torch, ComfyUI's Flux class, both
        # resolutions, 2 pooled rounds
        "comfyui_modfold": [[PY, "benchmarks/bench_comfyui_flux.py", "--out", str(work / "comfyui"), *cache, *(s or [
            "--rounds", "2", "--iters", "5", "--warmup", "3", "--only",
            "adapter int8,adapter int8 (norms in torch),adapter fp8,adapter fp8 (norms in torch)"])]],
        # the node's default attention (ComfyUI's kernel choice without its per-call backend-order scope) in Flux's
        # class: alone on bf16, on int8 against ComfyUI's own attention, 2 pooled rounds at both resolutions
        "comfyui_lean": [[PY, "benchmarks/bench_comfyui_flux.py", "--out", str(work / "comfyui"), *cache, *(s or [
            "--rounds", "2", "--iters", "5", "--warmup", "3", "--only",
            "bf16 + attention sdpa,adapter int8,adapter int8 + attention comfyui"])]],
        # the fused q / k norm + RoPE (nodes.flux_rope) in Flux's class against the stock ops, with the stock rows on
        # comfy-kitchen's CUDA kernels (the bundle built --slim: ComfyUI and ck.zip in one call), 2 pooled rounds
        "comfyui_rope": [[PY, "benchmarks/bench_comfyui_flux.py", "--out", str(work / "comfyui_rope"), *cache, *(s or [
            "--rounds", "2", "--iters", "5", "--warmup", "3", "--only",
            "bf16 + attention sdpa,adapter int8,adapter int8 (stock RoPE),adapter int8 + attention cudnn,"
            "ComfyUI int8 (same file)"])]],
        # the node's auto attention (runtime.sdpa_choice): per shape, cuDNN or ComfyUI's kernel as measured, from a
        # cold cache; bit-equal to the chosen kernel, the cache read back without timing
        "check_sdpa_choice": [[PY, "benchmarks/check_sdpa_choice_gpu.py", "--out", str(work / "kernels"), *cache]],
        # the same in whole models: Flux in ComfyUI's class at both resolutions, the auto default against the
        # former default (sdpa) and cudnn, 2 pooled rounds (the bundle built --slim: stock on comfy-kitchen CUDA)
        "comfyui_auto": [[PY, "benchmarks/bench_comfyui_flux.py", "--out", str(work / "comfyui_auto"), *cache, *(s or [
            "--rounds", "2", "--iters", "5", "--warmup", "3", "--only",
            "bf16 + attention auto,bf16 + attention cudnn,adapter int8,adapter int8 + attention sdpa,"
            "adapter int8 + attention cudnn,ComfyUI int8 (same file)"])]],
        # Wan 480p in ComfyUI's WanModel: the auto default against sdpa and cudnn, 2 pooled rounds
        "comfyui_wan_auto": [[PY, "benchmarks/bench_comfyui_wan.py", "--out", str(work / "comfyui_wan_auto"), *cache,
                              *(s or ["--rounds", "2", "--iters", "4", "--warmup", "2", "--only",
                                      "bf16 + attention auto,adapter int8,adapter int8 + attention sdpa,"
                                      "adapter int8 + attention cudnn,ComfyUI int8 (same file)"])]],
        # dense 16-bit copies (runtime.kernels.dense_copy) on this device's cost table: copied where int8 loses, bf16's
        # numbers, CUDA-graph replay, the dispatch report's row
        "check_dense_copy": [[PY, "benchmarks/check_dense_copy_gpu.py", "--out", str(work / "kernels")]],
        # SDXL in ComfyUI's class: the node's defaults with and without a copy budget (3 pooled rounds)
        # the same under torch's profiler: where a copied layer's step time goes (bf16, int8, int8 + copies)
        "profile_sdxl_copy": [[PY, "benchmarks/profile_comfyui_sdxl.py", "--out", str(work / "comfyui_sdxl"), *cache,
                               "--only", "adapter int8,adapter int8 + dense_copy_mb"]],
        "comfyui_sdxl_copy": [[PY, "benchmarks/bench_comfyui_sdxl.py", "--out", str(work / "comfyui_sdxl"), *cache,
                               *(s or ["--rounds", "3", "--only",
                                       "bf16 + attention auto,adapter int8,adapter int8 + dense_copy_mb"])]],
        # the same default attention's GPU check: bit-equal to ComfyUI's calls, declined where flash cannot run
        "check_lean_attention": [[PY, "benchmarks/check_lean_attention_gpu.py", "--out", str(work / "kernels"),
                                  *cache]],
        # Wan 2.x 14B-shaped t2v (4 blocks) at 480p / 81 frames (32,760 tokens) in ComfyUI: the same variants
        "comfyui_wan": [[PY, "benchmarks/bench_comfyui_wan.py", "--out", str(work / "comfyui_wan"), *cache, *s]],
        "comfyui_wan_rounds": [[PY, "benchmarks/bench_comfyui_wan.py", "--out", str(work / "comfyui_wan"), *cache,
                                *(s or ["--rounds", "2", "--iters", "5", "--warmup", "2"])]],
        # SDXL's whole UNet in ComfyUI's class at 1024², batch 2: bf16 vs the adapter (int8 with its transformer
        # blocks' LayerNorms folded, without, fp8) vs ComfyUI's own int8 file path
        "comfyui_sdxl": [[PY, "benchmarks/bench_comfyui_sdxl.py", "--out", str(work / "comfyui_sdxl"), *cache,
                          *(s or ["--rounds", "3", "--iters", "6", "--warmup", "4"])]],  # (run 86's one round: noise)
        # more, shorter rounds: the H100 hosts of runs 104-105, 110 and 114-115 ran slow phases of seconds (step
        # times bimodal, ~60 or ~90 ms) that 3 rounds cannot outvote; compare the variants round by round
        "comfyui_sdxl_rounds": [[PY, "benchmarks/bench_comfyui_sdxl.py", "--out", str(work / "comfyui_sdxl"), *cache,
                                 *(s or ["--rounds", "7", "--iters", "4", "--warmup", "3"])]],
        # the same through apply_model, with the node's cuda_graphs option on bf16 and on the folded int8 adapter
        # (SDXL in ComfyUI's class is host-bound: 90 ms of host per 41 ms of GPU a step under the profiler, run 87)
        "comfyui_sdxl_graphs": [[PY, "benchmarks/bench_comfyui_sdxl.py", "--graphs", "--out",
                                 str(work / "comfyui_sdxl_graphs"), *cache,
                                 *(s or ["--rounds", "2", "--iters", "6", "--warmup", "4"])]],
        # the same UNet under torch's profiler, folded against norms in torch: ops by device time and count, syncs,
        # norm-row re-derivations and memo growth (run 86: the fold 0.73x against 0.94x)
        "profile_sdxl": [[PY, "benchmarks/profile_comfyui_sdxl.py", "--out", str(work / "comfyui_sdxl"), *cache,
                          *s]],
        # ComfyUI's Flux class (6 + 12 blocks, 1024²) the same way, bf16 against the adapter's int8: the share of the
        # step outside the GEMMs (RoPE, q / k norms, stream joins) that the bench's own Flux class leaves out
        # the fused q / k norm + RoPE kernel against the stock ops (nodes.flux_rope, 2026-12-06)
        "checks_rope": [[PY, "benchmarks/check_kernels_gpu.py", "--out", str(work / "kernels"), "--only",
                         "check_flux_rope,check_flux_join,check_modulated_fold"]],
        "profile_flux": [[PY, "benchmarks/profile_comfyui_sdxl.py", "--family", "flux", "--out",
                          str(work / "comfyui_flux"), *cache, *s]],
        # Qwen-Image in ComfyUI's class (8 blocks, 1024²): the int8 defaults (fused q / k norms + RoPE) against
        # the stock ops (fuse_rope=False)
        "profile_qwen": [[PY, "benchmarks/profile_comfyui_sdxl.py", "--family", "qwen_image", "--out",
                          str(work / "comfyui_qwen"), *cache, *s]],
        # Z-Image's NextDiT (8 of 30 layers) / Qwen-Image's MMDiT (8 of 60 blocks) in ComfyUI's classes at 1024²: bf16
        # vs the adapter (int8 with the blocks' modulated norms handed to the layers they feed, without, fp8) vs
        # ComfyUI's own int8 file path
        "comfyui_zimage": [[PY, "benchmarks/bench_comfyui_dit.py", "--family", "zimage", "--out",
                            str(work / "comfyui_dit"), *cache, *(s or ["--rounds", "2", "--iters", "5", "--warmup", "3"])]],
        "comfyui_qwen_image": [[PY, "benchmarks/bench_comfyui_dit.py", "--family", "qwen_image", "--out",
                                str(work / "comfyui_dit"), *cache,
                                *(s or ["--rounds", "2", "--iters", "5", "--warmup", "3"])]],
        # LTX-Video 2B's DiT (8 of 28 blocks), a 768 x 768 x 97-frame video (7,488 tokens): its modulated RMSNorms
        # handed to attn1's q / k / v and the feed-forward (twenty-fourth session, built without a device)
        "comfyui_ltxv": [[PY, "benchmarks/bench_comfyui_dit.py", "--family", "ltxv", "--res", "768", "--out",
                          str(work / "comfyui_dit"), *cache, *(s or ["--rounds", "2", "--iters", "5", "--warmup", "3"])]],
        # T5-XXL-shaped text encoder in ComfyUI: bf16 vs "Enable INT8 on CLIP" vs ComfyUI's own int8 file path
        "comfyui_t5": [[PY, "benchmarks/bench_comfyui_t5.py", "--out", str(work / "comfyui_t5"), *cache, *s]],
        "autoprec": [[PY, "benchmarks/bench_autoprec.py", "--workdir", str(work / "auto_tmp"), "--json",
                      str(work / "autoprec" / "bench_autoprec.json"), *(s or ["--blocks", "2"])]],
    }


def unpack(scratch: Path) -> tuple[dict[str, str], Path | None]:
    """Unpack the carried archives into ``scratch`` (outside --out: a device call returns what --out holds);
    returns the environment for the steps and the ComfyUI cache folder."""
    env = dict(os.environ)
    extra = [str(ROOT)]
    whl = ROOT / ".whl"
    if (whl / "ck.zip").is_file():
        ck = scratch / "ck"
        zipfile.ZipFile(whl / "ck.zip").extractall(ck)
        extra.append(str(ck))
    cache = None
    if (whl / "comfyui.zip").is_file():
        zipfile.ZipFile(whl / "comfyui.zip").extractall(scratch / "cqcache")
        cache = scratch / "cqcache" / "comfyui-0.30.0"
    wheels = sorted((whl / "wheels").glob("*.whl")) if (whl / "wheels").is_dir() else []
    if wheels:
        subprocess.run([PY, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *map(str, wheels)],
                       check=False)
    env["PYTHONPATH"] = os.pathsep.join([*extra, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env, cache


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", default="kernels:150,sweep:100,lora:45,optimizers:80,comfyui:120",
                   help="comma-separated NAME:SECONDS, run in this order")
    p.add_argument("--smoke", action="store_true", help="every step in its CPU smoke mode")
    a = p.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    work = scratch / "work"  # only summary.txt and results.zip go under --out (a device call returns few files)
    for sub in ("kernels", "sweep", "tune", "lora", "optimizers", "comfyui", "comfyui_wan", "comfyui_t5", "comfyui_sdxl",
                "comfyui_sdxl_graphs", "comfyui_dit", "autoprec"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)
    env, cache = unpack(scratch)
    table = steps(work, a.smoke, cache)
    summary, results = a.out / "summary.txt", unused(a.out, "results", ".zip")
    lines = [f"gpu_suite {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, python {sys.version.split()[0]}"]
    try:
        import torch

        lines.append(f"torch {torch.__version__}, device "
                     f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
    except ImportError:
        lines.append("torch not importable")
    with open(summary, "a") as fh:  # (a second suite call in one device call adds to it)
        fh.write("\n".join(lines) + "\n")
    for item in a.steps.split(","):
        name, _, secs = item.partition(":")
        budget = float(secs or 60)
        start = time.perf_counter()
        before = output_files(work)
        log = work / f"{name}.log"
        status = []
        with open(log, "w") as fh:
            for cmd in table[name]:
                cmd = [c.replace("{budget}", str(int(max(30, budget - 15)))) for c in cmd]
                left = budget - (time.perf_counter() - start)
                if left < 5:
                    status.append("skipped: no time left")
                    break
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                try:
                    rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                        timeout=left).returncode
                    status.append(f"rc={rc}")
                except subprocess.TimeoutExpired:
                    status.append(f"timeout after {left:.0f}s")
        tail = log.read_text(errors="replace").splitlines()[-25:]
        step_lines = [f"\n== {name}: {', '.join(status)} in {time.perf_counter() - start:.0f}s", *tail]
        print("\n".join(step_lines), flush=True)
        with open(summary, "a") as fh:
            fh.write("\n".join(step_lines) + "\n")
        file_under_step(work, name, before)
        save_results(work, results)  # after every step: a call cut off later still returns what finished
    for tmp in SCRATCH_DIRS:
        shutil.rmtree(work / tmp, ignore_errors=True)
    print(f"wrote {summary} and {results}")
    return 0


SCRATCH_DIRS = ("opt_tmp", "auto_tmp")  # the steps' scratch folders under work/: never zipped, removed at the end


def output_files(work: Path) -> dict[Path, tuple[float, int]]:
    """(mtime, size) of every file the steps wrote under ``work``'s output folders (not the scratch folders, not
    the steps' own logs at its top)."""
    out = {}
    for f in work.rglob("*"):
        rel = f.relative_to(work)
        if f.is_file() and len(rel.parts) > 1 and rel.parts[0] not in SCRATCH_DIRS:
            st = f.stat()
            out[f] = (st.st_mtime, st.st_size)
    return out


def file_under_step(work: Path, name: str, before: dict[Path, tuple[float, int]]) -> None:
    """Move the files step ``name`` wrote or rewrote (against ``before``) to ``work/name/``, keeping their paths:
    steps share output folders (two sweeps both write ``sweep/bench.json``), so a later step of the same call
    would otherwise replace an earlier one's results (run 128 lost its SDXL / CLIP sweep's json that way)."""
    for f, stamp in output_files(work).items():
        if before.get(f) == stamp:
            continue
        dest = work / name / f.relative_to(work)
        dest.parent.mkdir(parents=True, exist_ok=True)
        f.replace(dest)


def save_results(work: Path, results: Path) -> None:
    """Zip ``work``'s files (under 8 MB, no checkpoints) to ``results``, replacing it whole: written beside it,
    then renamed, so a device call killed while it writes returns the previous step's complete zip."""
    part = results.with_name(results.name + ".part")
    with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(work.rglob("*")):
            if (f.is_file() and f.stat().st_size < 8 << 20 and f.suffix not in (".safetensors", ".pt")
                    and f.relative_to(work).parts[0] not in SCRATCH_DIRS):
                z.write(f, f.relative_to(work))
    os.replace(part, results)


def unused(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem+suffix``, or ``stem-2``, ``stem-3``, ... where an earlier suite call in the same device call
    wrote that name (run 123's second call replaced the first's results.zip)."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


if __name__ == "__main__":
    raise SystemExit(main())
