"""GPU checks of the norms folded into the activation quantizers (``check_kernels_gpu --only`` runs them): an
RMSNorm (``acts.RowNorm``), a DiT block's modulated LayerNorm and an affine LayerNorm as one shared modulation row
(``acts.ModulatedNorm``), each through ``QuantLinear``s and the dispatcher's own choice against float64."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from gpu_check_record import record, rel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.runtime.kernels import triton_quant


def _rows(shape: tuple) -> int:
    """Rows of an activation of this shape (a memo signature's x shape may be 2-D or 3-D)."""
    n = 1
    for d in shape[:-1]:
        n *= int(d)
    return n


def check_norm_fold() -> None:
    """An RMSNorm folded into the activation quantizer (``acts.RowNorm``): the block kernel's codes bit-equal to
    the same fp32 arithmetic in torch (codes of ``x * w``, the row factor in the scale), and ``QuantLinear``s with
    ``input_norm`` at every M on a T5 / Flux width (each path the dispatcher picks: folding ones in their
    quantizer, the rest after ``acts.rms_norm``) against the layer fed the norm in torch, first call and plan."""
    from torch import nn

    from comfyquant.runtime import QuantizedTensor
    from comfyquant.runtime.kernels.acts import RowNorm, rms_norm
    from comfyquant.runtime.kernels.dispatch import choose_backend
    from comfyquant.runtime.nn import NormSource, QuantLinear

    for m, k in ((1, 4096), (256, 4096), (4096, 4096), (77, 10240), (1024, 3072)):
        x = (torch.randn(m, k, device="cuda") * (torch.rand(m, 1, device="cuda") * 4 + 0.1)).bfloat16()
        w = (torch.rand(k, device="cuda") * 1.5 + 0.25).bfloat16()
        q, s = triton_quant.quantize_rows_int8(x, norm=RowNorm(w, 1e-6))
        xw = x.float() * w.float()
        sc = (xw.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-30)
        codes = (xw / sc).round().to(torch.int8)
        want_s = sc * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        d = (q.int() - codes.int()).abs()
        # run 76: 1 code in a few off at a tie against torch's fp32 on 4 of 5 shapes (bit-equal in the
        # interpreter): the compiled kernel's arithmetic differs at ties; the rotation checks' bound
        differ = int((d > 0).sum())
        record("norm_block_quantizer", int(d.max()) <= 1 and differ <= q.numel() // 1000 + 1
               and ((s - want_s).abs() / want_s).max().item() < 1e-5, m=m, k=k, max_code_diff=int(d.max()),
               codes_differing=differ, scale_rel=((s - want_s).abs() / want_s).max().item())
    torch.manual_seed(7)
    # int8-rot: the norm folded into the rotating row kernel (the W8A8 path's codes, the weight-only path's
    # rotation pass); fp32 x as ComfyUI runs its text encoders
    for fmt, dt in (("int8", torch.bfloat16), ("fp8", torch.bfloat16), ("int8-rot", torch.bfloat16),
                    ("int8-rot", torch.float32), ("int4-rot", torch.bfloat16)):
        for k, n in ((4096, 4096), (3072, 9216)) if dt == torch.bfloat16 else ((4096, 10240), (10240, 4096)):
            lin = nn.Linear(k, n, device="cuda", dtype=dt)
            holder = nn.Module()
            holder.weight = nn.Parameter((torch.rand(k, device="cuda") * 1.5 + 0.25).to(dt), requires_grad=False)
            layer = QuantLinear.from_linear(lin, fmt)
            plain = QuantLinear.from_linear(lin, fmt)
            layer.input_norm = NormSource(holder, 1e-6)
            qt = layer.qweight
            kp = qt.params
            _, opts = kp.format.kernel_args(kp.stored(qt.qdata), kp.layer_params)
            for m in (1, 16, 77, 256, 1024, 4096):
                x = (torch.randn(1, m, k, device="cuda") * 3).to(dt)
                y, again = layer(x), layer(x)
                ref = plain(rms_norm(x, RowNorm(holder.weight, 1e-6)))
                f64 = rms_norm(x.double(), RowNorm(holder.weight.double(), 1e-6)) @ qt.dequantize().double().t() \
                    + lin.bias.double()
                pick = choose_backend(x.view(m, k), kind=kp.format.kernel_kind, n=n, k=k, opts=tuple(opts)).name
                e, e_ref = rel(y, f64), rel(ref, f64)
                record("norm_linear", e <= 1.2 * e_ref + 2**-9 and torch.equal(y, again), fmt=fmt, dtype=str(dt),
                       m=m, k=k, n=n, backend=pick, rel=e, rel_unfolded=e_ref)
    # a SmoothQuant layer's pre_quant_scale as the quantizer's column scale (NORM 3): the layer fed x * p
    w = torch.randn(3072, 4096, device="cuda") * 0.02
    p = torch.rand(4096, device="cuda") + 0.5
    qt = QuantizedTensor.from_float(w, "int8", pre_quant_scale=p)
    smoothed = QuantLinear(4096, 3072, bias=False, weight=qt)
    plain = QuantLinear(4096, 3072, bias=False, weight=qt.with_parts(params=qt.params.replace(pre_quant_scale=None)))
    # against float64: the fold quantizes x * p in fp32 where the unfolded layer is fed bf16(x * p), so the two
    # int8 results differ by a code here and there (run 81: 0.0084 apart at 256 / 4,096 rows, each ~0.009 off
    # the reference); the fold must be as close to float64 as the layer fed x * p
    wd = qt.dequantize().double()
    for m in (16, 256, 4096):
        x = torch.randn(1, m, 4096, device="cuda").bfloat16()
        y, again = smoothed(x), smoothed(x)
        want = plain(x * p.bfloat16())
        f64 = x.double() @ wd.t()  # dequantize() is W: the smoothed layer computes (x * p) @ (W / p)^T
        e, e_ref = rel(y, f64), rel(want, f64)
        record("column_scale_linear", e <= 1.2 * e_ref + 2**-9 and torch.equal(y, again), m=m,
               backend=choose_backend(x.view(m, 4096), kind="int8", n=3072, k=4096).name, rel=e,
               rel_unfolded=e_ref, apart=rel(y, want))


def check_modulated_fold() -> None:
    """A modulated LayerNorm folded into the quantizer (``acts.ModulatedNorm``, ``runtime.modulation``): int8 /
    fp8 / int8-rot ``QuantLinear``s on Flux / Wan / SD3 widths, two batch items of 8-2,304 tokens, through the
    dispatcher's own choice (folding paths in their quantizer, the rest after the norm in torch) against the
    layer fed ``layer_mod`` in torch and float64; first call, plan, and the next step's modulation refilled into
    the same buffer; then the quantizer's codes against float64 (half a step)."""
    from torch import nn

    from comfyquant.runtime.kernels.acts import ModulatedNorm, layer_mod
    from comfyquant.runtime.kernels.dispatch import choose_backend
    from comfyquant.runtime.kernels.registry import kernel_kind
    from comfyquant.runtime.modulation import ModulationSite, modulated_linear
    from comfyquant.runtime.nn import QuantLinear

    torch.manual_seed(11)
    for fmt in ("int8", "fp8", "int8-rot"):
        for k, n in ((3072, 9216), (5120, 5120), (1536, 6144)):
            lin = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
            layer = QuantLinear.from_linear(lin, fmt)
            qt = layer.qweight
            kp = qt.params
            scales, opts = kp.format.kernel_args(kp.stored(qt.qdata), kp.layer_params)
            wd = qt.dequantize().double()
            site = ModulationSite(1e-6)
            for t in (8, 512, 2304):
                outs = []
                for step in range(2):  # the second step refills the site's buffer: the plan must read it
                    x = (torch.randn(2, t, k, device="cuda") * 2 + torch.randn(2, t, 1, device="cuda")).bfloat16()
                    mod = (torch.randn(2, 1, 6 * k, device="cuda") * 0.5).bfloat16()
                    shift, scale = mod[..., :k], mod[..., k:2 * k]
                    y, again = (modulated_linear(layer, x, shift, scale, 1e-6, site) for _ in range(2))
                    ref = layer(layer_mod(x, shift, scale, 1e-6))
                    f64 = layer_mod(x.double(), shift.double(), scale.double(), 1e-6) @ wd.t() + lin.bias.double()
                    outs.append(y)
                    pick = choose_backend(x.view(2 * t, k), kind=kp.format.kernel_kind, n=n, k=k,
                                          opts=tuple(opts)).name
                    e, e_ref = rel(y, f64), rel(ref, f64)
                    # where the picked backend folds it, its first-call check (dispatch._mod_check, kept by _norm_verdict) passed: the
                    # kernel ran the norm (a failed check would fall back to torch and still match)
                    b = kernel_kind(kp.format.kernel_kind).backends[pick]
                    folds = b.fuses_mod is not None and b.fuses_mod(tuple(scales), tuple(opts), 2 * t, n, k)
                    memo = layer.qweight._comfyquant_bound[1].memo
                    verdicts = [v[3] for sig, v in memo.items()
                                if sig[5] is not None and len(v) > 3 and _rows(sig[0]) == _rows(x.shape)]
                    record("modulated_linear", e <= 1.2 * e_ref + 2**-9 and torch.equal(y, again)
                           and (not folds or (verdicts and all(verdicts))), fmt=fmt, m=2 * t, k=k, n=n, step=step,
                           backend=pick, folds=folds, verdicts=verdicts, rel=e, rel_unfolded=e_ref)
    for m, k, rows in ((4608, 3072, 2304), (1024, 5120, 512), (300, 8192, 150)):
        x = (torch.randn(m, k, device="cuda") * 3 + torch.randn(m, 1, device="cuda")).bfloat16()
        mod = (torch.randn(m // rows, 2 * k, device="cuda") * 0.5).bfloat16()
        q, s = triton_quant.quantize_rows_int8(x, norm=ModulatedNorm(mod, 1e-6, rows))
        x64, m64 = x.double().view(-1, rows, k), mod.double()[:, None, :]
        y64 = (layer_mod(x64, m64[..., :k], m64[..., k:], 1e-6)).view(m, k)
        sc = y64.abs().amax(-1, keepdim=True) / 127
        steps = ((q.double() * s.double() - y64).abs() / sc).max().item()
        scale_rel = ((s.double() - sc).abs() / sc).max().item()
        record("modulated_quantizer", steps <= 0.5 + 1e-3 and scale_rel < 1e-5, m=m, k=k, err_steps=steps,
               scale_rel=scale_rel)


def check_layer_norm_fold() -> None:
    """An affine LayerNorm folded as one shared modulation row (``runtime.norms``, ``acts.shared_layer_norm``):
    int8 / fp8 / int8-rot ``QuantLinear``s with ``input_norm`` on CLIP-L / SDXL / CLIP-G widths at 77-16,384 rows
    through the dispatcher's own choice against float64 ``layer_norm(x, w, b) @ W^T``, within the unfolded
    layer's own error; where the picked backend folds it, its first-call check passed (a kernel that disagreed
    would fall back to torch and still match); the plan's second call equal to the first; then the block
    quantizer's codes against float64 (half a step)."""
    import torch.nn.functional as F
    from torch import nn

    from comfyquant.runtime.kernels.acts import shared_layer_norm
    from comfyquant.runtime.kernels.dispatch import choose_backend
    from comfyquant.runtime.kernels.registry import kernel_kind
    from comfyquant.runtime.nn import QuantLinear
    from comfyquant.runtime.norms import FoldedNorm, norm_spec

    torch.manual_seed(12)
    for fmt in ("int8", "fp8", "int8-rot"):
        for k, n in ((768, 3072), (1280, 1280), (640, 5120)):
            ln = nn.LayerNorm(k, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                ln.weight.copy_(torch.rand(k, device="cuda") * 1.5 + 0.05)
                ln.bias.copy_(torch.randn(k, device="cuda") * 0.2)
            lin = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
            layer, plain = QuantLinear.from_linear(lin, fmt), QuantLinear.from_linear(lin, fmt)
            layer.input_norm = FoldedNorm(ln, norm_spec(ln)).source()
            qt = layer.qweight
            kp = qt.params
            scales, opts = kp.format.kernel_args(kp.stored(qt.qdata), kp.layer_params)
            wd = qt.dequantize().double()
            for m in (77, 1024, 4096, 16384):
                x = (torch.randn(m, k, device="cuda") * 2 + torch.randn(m, 1, device="cuda")).bfloat16()
                y, again = layer(x), layer(x)
                ref = plain(ln(x))
                f64 = F.layer_norm(x.double(), (k,), ln.weight.double(), ln.bias.double(), 1e-5) @ wd.t()
                f64 = f64 + lin.bias.double()
                pick = choose_backend(x, kind=kp.format.kernel_kind, n=n, k=k, opts=tuple(opts)).name
                b = kernel_kind(kp.format.kernel_kind).backends[pick]
                folds = b.fuses_mod is not None and b.fuses_mod(tuple(scales), tuple(opts), m, n, k)
                memo = layer.qweight._comfyquant_bound[1].memo
                verdicts = [v[3] for sig, v in memo.items()  # (this call's shape: a smaller one's pick may not fold)
                            if sig[5] is not None and len(v) > 3 and _rows(sig[0]) == _rows(x.shape)]
                e, e_ref = rel(y, f64), rel(ref, f64)
                record("layer_norm_linear", e <= 1.2 * e_ref + 2**-9 and torch.equal(y, again)
                       and (not folds or (verdicts and all(verdicts))), fmt=fmt, m=m, k=k, n=n, backend=pick,
                       folds=folds, verdicts=verdicts, rel=e, rel_unfolded=e_ref)
    for m, k in ((4096, 640), (1024, 1280), (77, 768)):
        x = (torch.randn(m, k, device="cuda") * 3 + torch.randn(m, 1, device="cuda")).bfloat16()
        w = (torch.rand(k, device="cuda") * 1.5 + 0.05).bfloat16()
        bias = (torch.randn(k, device="cuda") * 0.2).bfloat16()
        q, s = triton_quant.quantize_rows_int8(x, norm=shared_layer_norm(w, bias, k, 1e-5))
        y64 = F.layer_norm(x.double(), (k,), w.double(), bias.double(), 1e-5)
        sc = y64.abs().amax(-1, keepdim=True) / 127
        steps = ((q.double() * s.double() - y64).abs() / sc).max().item()
        record("layer_norm_quantizer", steps <= 0.5 + 1e-3, m=m, k=k, err_steps=steps)


def check_call_norms() -> None:
    """A modulated norm handed to a fused q / k / v group for one call (``modulation.modulated_call``: Wan's and
    Qwen-Image's blocks, ``nodes.wan_blocks``): int8 / fp8 sibling groups on Wan / Qwen-Image widths, two batch
    items of 8-4,096 tokens, against the same layers fed ``layer_mod`` in torch and float64; the group fused
    (one GEMM, the norm in its quantizer where the pick folds it) from the call after it learned its plan; then a
    modulated RMSNorm (Z-Image's) handed to one int8 / fp8 / int8-rot layer on its widths, and LTX-Video's (a
    shift, no weight, a bf16 buffer) to a fused q / k / v group."""
    from torch import nn

    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.kernels.acts import layer_mod
    from comfyquant.runtime.modulation import ModulationSite, modulated_call
    from comfyquant.runtime.siblings import fuse_sibling_projections

    class Attention(nn.Module):
        def __init__(self, k: int) -> None:
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(k, k, device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat((self.q(x), self.k(x), self.v(x)), -1)

    def pair(k: int, fmt: str) -> tuple[Attention, Attention, torch.Tensor, torch.Tensor]:
        """(q / k / v quantized and fused, the same unfused, their float64 weight and bias stacked)."""
        attn, plain = Attention(k), Attention(k)
        plain.load_state_dict(attn.state_dict())
        w64 = torch.cat([m.weight for m in (attn.q, attn.k, attn.v)]).double()
        b64 = torch.cat([m.bias for m in (attn.q, attn.k, attn.v)]).double()
        for net in (attn, plain):
            quantize_(net, QuantizeConfig(format=fmt))
        fuse_sibling_projections(attn)
        return attn, plain, w64, b64

    torch.manual_seed(13)
    for fmt in ("int8", "fp8"):
        for k in (5120, 3072):
            attn, plain, w64, b64 = pair(k, fmt)
            layers, site, group = [attn.q, attn.k, attn.v], ModulationSite(1e-6), attn.q.sibling[0]
            for t in (8, 1024, 4096):
                for step in range(3):  # the first call observes, then the group fuses
                    x = (torch.randn(2, t, k, device="cuda") * 2 + torch.randn(2, t, 1, device="cuda")).bfloat16()
                    mod = (torch.randn(2, 1, 2 * k, device="cuda") * 0.5).bfloat16()
                    shift, scale = mod[..., :k], mod[..., k:]
                    before = group.fused_calls
                    y = modulated_call(attn, layers, x, shift, scale, 1e-6, site)
                    ref = plain(layer_mod(x, shift, scale, 1e-6))
                    f64 = layer_mod(x.double(), shift.double(), scale.double(), 1e-6) @ w64.t() + b64
                    e, e_ref = rel(y, f64), rel(ref, f64)
                    fused = group.fused_calls > before
                    record("call_norm_group", e <= 1.2 * e_ref + 2**-9 and (step == 0 or fused), fmt=fmt, m=2 * t,
                           k=k, step=step, fused=fused, rel=e, rel_unfolded=e_ref)
    # a modulated RMSNorm (Z-Image's rms_norm(x) * w * (1 + scale), nodes.lumina_blocks) handed to one layer
    from comfyquant.runtime.modulation import RmsModulationSite, with_call_norms

    for fmt in ("int8", "fp8", "int8-rot"):
        k, n = 3840, 11520
        net = nn.Sequential(nn.Linear(k, n, device="cuda", dtype=torch.bfloat16))
        w64, b64 = net[0].weight.double(), net[0].bias.double()
        quantize_(net, QuantizeConfig(format=fmt))
        layer, site = net[0], RmsModulationSite(1e-5)
        nw = torch.rand(k, device="cuda") * 1.5 + 0.05
        for t in (22, 1024, 4096):
            x = (torch.randn(2, t, k, device="cuda") * 2).bfloat16()
            scale = (torch.randn(2, k, device="cuda") * 0.3).bfloat16()
            norm = site.norm(nw, scale, t)
            y = with_call_norms(layer, (([layer], norm),), x)
            xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double() * (
                1 + scale.double()[:, None, :])
            ref = layer(xn.bfloat16())
            f64 = xn @ w64.t() + b64
            e, e_ref = rel(y, f64), rel(ref, f64)
            record("call_norm_rms", e <= 1.2 * e_ref + 2**-9, fmt=fmt, m=2 * t, k=k, rel=e, rel_unfolded=e_ref)
    # LTX-Video's rms_norm(x) * (1 + scale) + shift (no weight; the shift and scale per item in the model's bf16,
    # ModulationSite(rms=True), nodes.ltx_blocks) handed to a fused q / k / v group on LTXV 2B's width
    for fmt in ("int8", "fp8"):
        k = 2048
        attn, plain, w64, b64 = pair(k, fmt)
        layers, site = [attn.q, attn.k, attn.v], ModulationSite(1e-6, rms=True)
        for t in (8, 1024, 7488):
            for step in range(2):
                x = (torch.randn(2, t, k, device="cuda") * 2).bfloat16()
                shift, scale = ((torch.randn(2, 1, k, device="cuda") * s).bfloat16() for s in (0.5, 0.3))
                y = with_call_norms(attn, ((layers, site.norm(shift, scale, t)),), x)
                xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * (
                    1 + scale.double()) + shift.double()
                ref, f64 = plain(xn.bfloat16()), xn @ w64.t() + b64
                e, e_ref = rel(y, f64), rel(ref, f64)
                record("call_norm_ltx", e <= 1.2 * e_ref + 2**-9, fmt=fmt, m=2 * t, k=k, step=step, rel=e,
                       rel_unfolded=e_ref)


def check_flux_rope() -> None:
    """The q / k RMSNorm + RoPE kernel (``runtime.rope.norm_rope_heads`` on CUDA) against the stock ops on the same
    GPU tensors (``F.rms_norm`` per head, the join of the streams, comfy-kitchen's eager RoPE formula) at Flux's
    widths: a double block's text (512) and image (4,096) streams into the joint q / k / v, a single block's strided
    ``linear1`` rows. Bound: within two bf16 steps of each element's pair magnitude (the norm's and the store's
    roundings); v bit-equal; most elements bit-equal (same fp32 formulas, another summation order)."""
    import torch.nn.functional as F

    from comfyquant.runtime.rope import kernel_applies, norm_rope_heads, rope_reference

    heads, d, eps = 24, 128, 1e-6
    g = torch.Generator(device="cuda").manual_seed(7)

    def pe_rows(n: int) -> torch.Tensor:
        pos = torch.randint(0, 128, (1, n), device="cuda", generator=g).double()
        a = pos[..., None] / (10000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d))
        return torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], -1).reshape(1, 1, n, d // 2, 2, 2).float()

    def within(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float, float]:
        err = (got.double() - want.double()).abs()
        pair = want.double().reshape(*want.shape[:-1], -1, 2).norm(dim=-1, keepdim=True)
        bound = 2 * 2.0 ** -8 * pair.expand(*pair.shape[:-1], 2).reshape(want.shape) + 1e-6
        return bool((err <= bound).all()), float(err.max()), float((got == want).float().mean())

    lt, li = 512, 4096
    pe = pe_rows(lt + li)
    streams = [torch.randn(1, n, 3 * heads * d, device="cuda", generator=g).bfloat16() * 3 for n in (lt, li)]
    ws = [tuple((1 + 0.3 * torch.randn(d, device="cuda", generator=g)).bfloat16() for _ in range(2)) for _ in range(2)]
    record("flux_rope_kernel_applies", all(kernel_applies((streams[j],) * 3, heads, d, ws[j], pe, lt + li)
                                           for j in (0, 1)))
    out = tuple(torch.empty(1, heads, lt + li, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for j, start in ((0, 0), (1, lt)):
        norm_rope_heads(streams[j], heads, d, *ws[j], eps, pe, out, start)
    parts = [s.view(1, s.shape[1], 3, heads, d).permute(2, 0, 3, 1, 4) for s in streams]
    for i, name in ((0, "q"), (1, "k")):
        normed = [F.rms_norm(parts[j][i], (d,), ws[j][i], eps) for j in range(2)]
        want = rope_reference(torch.cat(normed, dim=2), pe)
        ok, err, same = within(out[i], want)
        record(f"flux_rope_double_{name}", ok and same > 0.9, max_err=err, bit_equal=same)
    record("flux_rope_double_v", torch.equal(out[2], torch.cat((parts[0][2], parts[1][2]), dim=2)))
    n = lt + li
    h = torch.randn(1, n, 3 * heads * d + 4 * heads * d, device="cuda", generator=g).bfloat16() * 3
    qw, kw = ws[0]
    q, k, v = norm_rope_heads(h, heads, d, qw, kw, eps, pe, write_v=False)
    view = h[..., :3 * heads * d].view(1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    for got, src, w, name in ((q, view[0], qw, "q"), (k, view[1], kw, "k")):
        ok, err, same = within(got, rope_reference(F.rms_norm(src, (d,), w, eps), pe))
        record(f"flux_rope_single_{name}", ok and same > 0.9, max_err=err, bit_equal=same)
    record("flux_rope_single_v_view", v.data_ptr() == view[2].data_ptr())
    # Qwen-Image: q / k / v from three projections into the image rows of the joint buffers, with the rotations
    # its forward casts to bf16: against the stock formula in fp32 on the same bf16 rotations (comfy-kitchen's
    # CUDA kernel widens them so; rope_reference on the bf16 tensor would round every product to bf16)
    from comfyquant.runtime.rope import norm_rope_parts

    pe16 = pe.bfloat16()
    srcs = tuple(torch.randn(1, li, heads * d, device="cuda", generator=g).bfloat16() * 3 for _ in range(3))
    record("qwen_rope_kernel_applies", kernel_applies(srcs, heads, d, ws[1], pe16, lt + li))
    out = tuple(torch.zeros(1, heads, lt + li, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    norm_rope_parts(srcs, (0, 0, 0), heads, d, *ws[1], eps, pe16, out, lt)
    rows = pe16[:, :, lt:].float()
    for i, name in ((0, "q"), (1, "k")):
        normed = F.rms_norm(srcs[i].view(1, li, heads, d).transpose(1, 2), (d,), ws[1][i], eps)
        ok, err, same = within(out[i][:, :, lt:], rope_reference(normed, rows))
        record(f"qwen_rope_bf16_pe_{name}", ok and same > 0.9, max_err=err, bit_equal=same)
    record("qwen_rope_v", torch.equal(out[2][:, :, lt:], srcs[2].view(1, li, heads, d).transpose(1, 2)))


def check_flux_join() -> None:
    """A Flux single block's ``linear2`` input in one pass (``runtime.join.join_act``) against the stock ops on the
    same GPU tensors (GELU of ``linear1``'s strided MLP half, then ``torch.cat``): the attention half bit-equal, the
    GELU half within a bf16 step (the kernel's tanh is a sigmoid), the kernel taken."""
    import torch.nn.functional as F

    from comfyquant.runtime.join import join_act

    g = torch.Generator(device="cuda").manual_seed(9)
    n, d = 4608, 3072
    attn = torch.randn(1, n, d, device="cuda", generator=g).bfloat16()
    h = torch.randn(1, n, 3 * d + 4 * d, device="cuda", generator=g).bfloat16() * 3
    mlp = h[..., 3 * d:]
    for act, fn in (("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")), ("gelu", F.gelu)):
        got, want = join_act(attn, mlp, act), torch.cat((attn, fn(mlp)), -1)
        err = (got[..., d:].double() - want[..., d:].double()).abs()
        ok = bool((err <= 2.0 ** -7 * want[..., d:].double().abs() + 1e-6).all())
        same = float((got == want).float().mean())
        record(f"flux_join_{act}", ok and torch.equal(got[..., :d], attn) and same > 0.9, max_err=float(err.max()),
               bit_equal=same)
