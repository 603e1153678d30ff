"""GPU accuracy checks for every kernel (run on the H100/H200): float64 references on fresh random inputs.

Bounds (stated, asserted; each bullet's checks live in the module named, ``here`` is this file):
* activation quant kernels (``check_acts_gpu``): the int8 codes equal the torch reference on the same (fp32)
  input exactly for the plain path; with the rotation, fp32 butterflies in another order may move a code by 1
  at a .5 tie (asserted: max |diff| <= 1, <= 0.1% of codes); fp8 codes equal the torch cast exactly.
* int32 GEMM (``check_gemm_gpu``): bit-for-bit equal to ``torch._int_mm`` on random int8 inputs (any shape;
  padding handled).
* persistent-grid W8A8 GEMM (``TileConfig.persistent`` 1, 2; ``check_gemm_gpu``): the scaled bf16 output
  bit-equal to the one-program-per-tile kernel's with the same tile (same per-tile arithmetic), and the pick
  uses it.
* W8A8 linear (here): ``rel <= 1.5 * (eps_x + eps_w) + 2^-7`` vs the float64 product of the unquantized
  inputs, where eps are the measured relative quantization errors of x (per row) and W; and ``rel <= 2^-7`` vs
  the torch reference path on the same inputs (bf16 output rounding).
* W8A16 / fp8 (here): vs float64 of the dequantized weight (bf16 output): ``rel <= 2^-7``; fp8 vs unquantized
  < 0.08.
* Triton FP8 W8A8 (kind fp8, backend ``triton``; here): vs float64 of its own fp8 codes and scales
  ``rel <= 2^-7`` (bf16 output), vs the unquantized product the W8A8 bound; in fp32 output its accumulation
  error at most twice ``_scaled_mm``'s (cuBLAS without fast accumulation) on the same codes.
* fused W8A8 (quantization inside the GEMM, the two-launch path's codes; here, from 64 rows
  ``check_acts_gpu``): the same bound as W8A8; dequant + cuBLAS (here, block-scaled ``check_acts_gpu``): vs
  float64 of the dequantized weight ``rel <= 2^-7``.
* W4A8 (int4_rot; ``check_acts_gpu``): vs the torch reference path on the same inputs ``rel <= 2^-7``
  (identical integer math, bf16 output), and vs comfy-kitchen's CUDA
  ``convrot_w4a4_linear(linear_dtype="int8")`` ``rel <= 2^-6``.
* CUDA graphs (``check_paths_gpu``, with the plans, attention, sibling, input-activation and LoRA checks):
  ``cuda_graphs.capture`` of a quantized block replays within ``2^-7`` of its eager output.
Before every check the allocator's free memory is filled with NaN, so an output element never written fails.
Writes a JSON report to $OUT (or --out) and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from gpu_check_record import RESULTS, record, rel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.quant.fp8 import quantize_fp8
from comfyquant.quant.hadamard import choose_group_size, fast_hadamard, rotate_weight
from comfyquant.quant.int8 import quantize_rowwise, quantize_tensorwise
from comfyquant.runtime.kernels import reference, triton_int8, triton_quant
from comfyquant.runtime.kernels.dispatch import choose_backend, fp8_linear, int8_linear


def inputs(m: int, k: int, how: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Random activations with the requested memory layout (values never all zero)."""
    if how == "contig":
        return torch.randn(m, k, device="cuda").to(dtype)
    if how == "transposed":
        return torch.randn(k, m, device="cuda").to(dtype).t()
    if how == "row_stride":  # a column slice: rows further apart than K
        return torch.randn(m, k + 24, device="cuda").to(dtype)[:, 5:5 + k]
    if how == "3d":
        return torch.randn(2, -(-m // 2), k, device="cuda").to(dtype)
    raise ValueError(how)


def check_linear() -> None:
    for m, k, n, how, scale_kind in [
        (1, 3072, 3072, "contig", "row"), (16, 3072, 9216, "transposed", "row"), (77, 100, 70, "row_stride", "row"),
        (256, 5120, 13824, "3d", "tensor"), (4096, 3072, 3072, "contig", "row"), (1000, 12288, 3072, "3d", "row"),
        (33, 640, 640, "transposed", "tensor"),
    ]:
        x = inputs(m, k, how)
        w = torch.randn(n, k, device="cuda") * 0.03
        bias = torch.randn(n, device="cuda").bfloat16()
        q, s = quantize_rowwise(w) if scale_kind == "row" else quantize_tensorwise(w)
        ref64 = x.double() @ w.double().t() + bias.double()
        x2d = x.reshape(-1, k).float()
        qx, sx = reference.quantize_rows_int8(x2d)
        eps = rel(qx.double() * sx.double(), x2d) + rel(q.double() * s.double(), w)
        ref_path = int8_linear(x, q, s, bias, backend="torch")
        # the one-launch kernel quantizes x as the activation kernel does: the two-launch output, bit for bit
        fused, two = int8_linear(x, q, s, bias, backend="triton_fused"), int8_linear(x, q, s, bias, backend="triton")
        record("w8a8_fused_equals_two_launch", torch.equal(fused, two), m=m, k=k, n=n, layout=how,
               max_diff=float((fused.float() - two.float()).abs().max()))
        for backend in ("triton", "triton_fused", "triton_fused_kblock", "triton_w8a16", "dequant"):
            y = int8_linear(x, q, s, bias, backend=backend)
            finite = bool(torch.isfinite(y).all())
            if backend == "triton_fused_kblock":  # per-row-and-128-column activation scales: its own reference
                want = reference.int8_linear_kblock_ref(x, q, s, bias, torch.float32)
                e, e_ref = rel(y, ref64), rel(y, want)
                ok = finite and e <= 1.5 * eps + 2**-7 and e_ref <= 2**-7
                record(f"w8a8_linear_{backend}", ok, m=m, k=k, n=n, layout=how, scale=scale_kind, rel=e,
                       bound=1.5 * eps + 2**-7, rel_vs_reference=e_ref)
            elif backend in ("triton", "triton_fused"):
                e, e_ref = rel(y, ref64), rel(y, ref_path)
                ok = finite and e <= 1.5 * eps + 2**-7 and e_ref <= 2**-7
                record(f"w8a8_linear_{backend}", ok, m=m, k=k, n=n, layout=how, scale=scale_kind, rel=e,
                       bound=1.5 * eps + 2**-7, rel_vs_torch_path=e_ref)
            else:
                exact = x.double() @ (q.double() * s.double()).t() + bias.double()
                e = rel(y, exact)
                record(f"{backend}_linear", finite and e <= 2**-7, m=m, k=k, n=n, layout=how, rel=e)
        # convrot: rotated weight, activations rotated in the kernel
        g = choose_group_size(k)
        if g is not None:
            qr, sr = quantize_rowwise(rotate_weight(w, g))
            xr = fast_hadamard(x2d.double(), g)
            qxr, sxr = reference.quantize_rows_int8(xr.float())
            eps_r = rel(qxr.double() * sxr.double(), xr) + rel(qr.double() * sr.double(), rotate_weight(w.double(), g))
            for backend in ("triton", "triton_w8a16"):
                y = int8_linear(x, qr, sr, bias, convrot_group=g, backend=backend)
                e = rel(y, ref64)
                bound = (1.5 * eps_r + 2**-7) if backend == "triton" else 2 * rel(qr.double() * sr.double(),
                                                                                   rotate_weight(w.double(), g)) + 2**-7
                record(f"convrot_{backend}", bool(torch.isfinite(y).all()) and e <= bound, m=m, k=k, n=n,
                       group=g, rel=e, bound=bound)
        if k % 16 == 0 and n % 16 == 0:
            qf, sf = quantize_fp8(w)
            for static in (False, True):
                isc = (x.float().abs().amax() / 448).reshape(()) if static else None
                y = fp8_linear(x, qf, sf, bias, input_scale=isc, backend="scaled_mm")
                yr = fp8_linear(x, qf, sf, bias, input_scale=isc, backend="torch")
                e_ref, e64 = rel(y, yr), rel(y, ref64)
                record("fp8_scaled_mm", e_ref <= 2**-7 and e64 < 0.08, m=m, k=k, n=n, static=static,
                       rel_vs_torch_path=e_ref, rel=e64)
            for backend in ("triton_w8a16", "dequant"):  # weight-only fp8 paths
                y = fp8_linear(x, qf, sf, bias, backend=backend)
                e = rel(y, x.double() @ (qf.double() * sf.double()).t() + bias.double())
                record(f"fp8_{backend}_linear", bool(torch.isfinite(y).all()) and e <= 2**-7, m=m, k=k, n=n, rel=e)
        # the automatic choice (what QuantLinear uses), eager and (twice) through the custom op compiled
        y_auto = int8_linear(x, q, s, bias)
        e_auto = rel(y_auto, ref64)
        info = {}
        if m == 16:
            y_comp = torch.compile(lambda t, q=q, s=s, b=bias: int8_linear(t, q, s, b), fullgraph=True)(x)
            info["rel_compiled_vs_auto_bound"] = rel(y_comp, ref64)
            e_auto = max(e_auto, info["rel_compiled_vs_auto_bound"])
        record("auto_backend", e_auto <= 1.5 * eps + 2**-7, m=m, k=k, n=n, rel=e_auto, **info)


def check_fp8_triton() -> None:
    """The Triton FP8 W8A8 GEMM: e4m3fn and e5m2 weights, tensor and row weight scales, dynamic and static
    activation scales, ragged K (pointer kernel, masked tails) and K % 16 == 0 (TMA kernel on Hopper)."""
    for m, k, n, how in [(1, 3072, 3072, "contig"), (77, 100, 70, "row_stride"), (256, 5120, 13824, "3d"),
                         (4096, 3072, 3072, "contig"), (1000, 12288, 3072, "transposed"), (33, 200, 640, "contig")]:
        x = inputs(m, k, how)
        x2d = x.reshape(-1, k)
        w = torch.randn(n, k, device="cuda") * 0.03
        bias = torch.randn(n, device="cuda").bfloat16()
        for wdt in (torch.float8_e4m3fn, torch.float8_e5m2):
            qf, sf = quantize_fp8(w, wdt)
            for scale_kind in ("tensor", "row"):
                sw = sf if scale_kind == "tensor" else (torch.rand(n, 1, device="cuda") + 0.5) * sf
                w_deq = qf.double() * sw.double().reshape(-1, 1)
                for static in (False, True):
                    isc = (x.float().abs().amax() / torch.finfo(wdt).max).reshape(()) if static else None
                    y = fp8_linear(x, qf, sw, bias, input_scale=isc, backend="triton")
                    qx, sx = triton_quant.quantize_rows_fp8(x2d, wdt, isc)
                    xq = qx.double() * sx.double()
                    own = (xq @ w_deq.t() + bias.double()).reshape(y.shape)
                    ref64 = x.double() @ (w.double() * sw.double().reshape(-1, 1) / sf.double()).t() + bias.double()
                    bound = 1.5 * (rel(xq, x2d) + rel(w_deq, w * sw / sf)) + 2**-7
                    e_own, e64 = rel(y, own), rel(y, ref64)
                    record("fp8_triton_linear", bool(torch.isfinite(y).all()) and e_own <= 2**-7 and e64 <= bound,
                           m=m, k=k, n=n, layout=how, weight=str(wdt), scale=scale_kind, static=static, rel=e64,
                           bound=bound, rel_vs_own_codes=e_own)
        if k % 16 == 0 and n % 16 == 0 and m > 16:  # accumulation precision vs cuBLAS on the same codes (fp32 out)
            qf, sf = quantize_fp8(w)
            isc = (x.float().abs().amax() / 448).reshape(())
            qx, _ = triton_quant.quantize_rows_fp8(x2d, qf.dtype, isc)
            exact = (qx.double() * isc.double()) @ (qf.double() * sf.double()).t()
            y = triton_int8.fp8_linear(x2d, qf, sf, None, isc, torch.float32)
            errs = {fast: rel(torch._scaled_mm(qx, qf.t(), scale_a=isc.float(), scale_b=sf.float(),
                                               out_dtype=torch.float32, use_fast_accum=fast), exact)
                    for fast in (False, True)}
            e = rel(y, exact)
            record("fp8_triton_fp32_accumulation", e <= 2 * errs[False] + 1e-6, m=m, k=k, n=n, rel=e,
                   rel_scaled_mm=errs[False], rel_scaled_mm_fast_accum=errs[True])


def check_fp8_low_rank_choice() -> None:
    """The automatic fp8 choice on this device (its measured costs): a rank-32 low-rank term at M=4096 on the
    Flux qkv / mlp0 shapes takes the fusing Triton GEMM (without a term the Gluon fp8 GEMM, also "triton", has
    been the choice since the fifteenth session; ``_scaled_mm`` before)."""

    for k, n in ((3072, 9216), (3072, 12288)):
        x = torch.randn(4096, k, device="cuda").bfloat16()
        plain = choose_backend(x, kind="fp8", n=n, k=k)
        lora = choose_backend(x, kind="fp8", n=n, k=k, low_rank=32)
        record("fp8_low_rank_choice", plain.name in ("scaled_mm", "triton") and lora.name == "triton", k=k, n=n,
               plain=plain.name, with_low_rank=lora.name, reason=lora.reason)


def _checks() -> tuple:
    """Every check, in the order they run (the activation quantizers' from ``check_acts_gpu``, the GEMMs' from
    ``check_gemm_gpu``, the runtime paths' from ``check_paths_gpu``, the folded norms' from
    ``check_norms_gpu``)."""
    from check_acts_gpu import (
        check_act_quant,
        check_block,
        check_fused_rows,
        check_group_rows,
        check_held_rotation,
        check_w4a8,
    )
    from check_gemm_gpu import (
        check_int_mm_exact,
        check_persistent,
        check_resident,
        check_resident_ws,
        check_ws_experimental,
        check_ws_fp8,
        check_ws_gemm,
        check_ws_lora_wired,
    )
    from check_norms_gpu import (
        check_call_norms,
        check_flux_join,
        check_flux_rope,
        check_layer_norm_fold,
        check_modulated_fold,
        check_norm_fold,
    )
    from check_paths_gpu import (
        check_attention,
        check_attention_cudnn,
        check_cuda_graphs,
        check_inference_mode,
        check_input_act,
        check_low_rank_epilogue,
        check_plans,
        check_siblings,
    )

    return (check_act_quant, check_held_rotation, check_group_rows, check_int_mm_exact, check_persistent,
            check_ws_gemm, check_ws_lora_wired, check_linear, check_fused_rows, check_fp8_triton,
            check_fp8_low_rank_choice, check_block, check_w4a8, check_low_rank_epilogue, check_input_act, check_plans, check_cuda_graphs,
            check_inference_mode, check_attention, check_attention_cudnn, check_ws_fp8, check_ws_experimental,
            check_siblings, check_norm_fold, check_modulated_fold, check_layer_norm_fold, check_call_norms,
            check_flux_rope, check_flux_join, check_resident, check_resident_ws)


# checks of kernels no GPU has run yet: run only when named in ``--only`` (a hang there must not cost a whole
# default run, nor a gpu_suite step that runs every check)
OPT_IN = frozenset({"check_resident_ws"})


def selected(only: set[str]) -> list:
    """The checks a run takes: those ``--only`` names, else every check but the :data:`OPT_IN` ones."""
    names = only or {fn.__name__ for fn in _checks()} - OPT_IN
    return [fn for fn in _checks() if fn.__name__ in names]


def _only(value: str) -> set[str]:
    """``--only``'s names, each a check of :func:`_checks` (a misspelt one would silently run nothing)."""
    names = {n for n in value.split(",") if n}
    unknown = sorted(names - {fn.__name__ for fn in _checks()})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown check(s) {', '.join(unknown)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for check_kernels.json")
    p.add_argument("--only", type=_only, default=set(), help="comma-separated check function names (default: all)")
    a = p.parse_args(argv)
    only = a.only
    torch.manual_seed(1234)
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for fn in selected(only):
        try:
            fn()
        except Exception as e:  # a kernel that fails to compile or run is a failed check, and the rest still run
            import traceback

            traceback.print_exc()
            record(fn.__name__, False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    failed = [r for r in RESULTS if not r["ok"]]
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "check_kernels.json").write_text(json.dumps(RESULTS, indent=1))
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
