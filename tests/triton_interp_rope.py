"""Interpreter checks of the fused q / k RMSNorm + RoPE kernel (``kernels.triton_rope``) and of the joined
activation (``kernels.triton_join``: a Flux single block's ``cat((attn, gelu(mlp)))``).

Oracle: the stock ops in float64 (``F.rms_norm`` per head with its weight, then ComfyUI's interleaved rotation
``out[2i + r] = pe[i, r, 0] x[2i] + pe[i, r, 1] x[2i + 1]``), with the norm's output rounded to the stream's dtype
first as the stock blocks round it. The kernel must match it to the dtype's resolution (the interpreter's bf16
store truncates, so a bf16 element may sit one step off), copy v bit for bit, write exactly its rows of the joint
buffers (a double block's two streams at their offsets), read a strided single-block projection (``linear1``'s
qkv + MLP rows), broadcast a one-row ``pe`` over the batch, and run without the norm or without the rotation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from triton_interp import interp_cast, record, rel

F16, BF16 = torch.float16, torch.bfloat16


def _pe(batch: int, tokens: int, head_dim: int, seed: int) -> torch.Tensor:
    """EmbedND-shaped rotations ``[batch, 1, tokens, D/2, 2, 2]`` fp32: ``[[cos, -sin], [sin, cos]]`` of random
    positions times RoPE's frequencies."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 64, (batch, tokens), generator=g).double()
    omega = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    a = pos[..., None] * omega
    rot = torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], dim=-1).reshape(batch, tokens, head_dim // 2, 2, 2)
    return rot[:, None].float().contiguous()


def _want(x: torch.Tensor, w: torch.Tensor | None, pe: torch.Tensor | None, eps: float) -> torch.Tensor:
    """float64 stock result for ``x`` ``[B, H, L, D]`` (dtype of the stream), ``pe`` rows for those L tokens."""
    y = x.double()
    if w is not None:  # rounded as the interpreter stores it (bf16: truncated; the GPU checks cover the GPU's)
        y = interp_cast(F.rms_norm(y, (x.shape[-1],), w.double(), eps).float(), x.dtype).double()
    if pe is not None:
        y2 = y.reshape(*y.shape[:-1], -1, 2)
        p = pe.double()
        out = torch.stack([p[..., 0, 0] * y2[..., 0] + p[..., 0, 1] * y2[..., 1],
                           p[..., 1, 0] * y2[..., 0] + p[..., 1, 1] * y2[..., 1]], dim=-1)
        y = out.reshape(y.shape)
    return y


def _close(got: torch.Tensor, want: torch.Tensor) -> tuple[bool, float]:
    """Elementwise within two steps of ``got``'s dtype at its pair's magnitude (plus 1e-6): the store's rounding,
    and a norm output one step apart where fp32 and float64 round it to either side."""
    step = 2.0 ** -(8 if got.dtype == BF16 else 11)
    err = (got.double() - want).abs()
    pair = want.reshape(*want.shape[:-1], -1, 2).norm(dim=-1, keepdim=True).expand(*want.shape[:-1], -1, 2)
    ok = bool((err <= 2 * step * pair.reshape(want.shape) + 1e-6).all())
    return ok, float(err.max())


def _weights(d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((1 + 0.3 * torch.randn(d, generator=g)).to(dtype), (1 + 0.3 * torch.randn(d, generator=g)).to(dtype))


def check_norm_rope() -> None:
    from comfyquant.runtime.kernels.triton_rope import norm_rope_launch

    eps = 1e-6
    for dtype, heads, d, lt, li, batch in ((BF16, 3, 64, 5, 37, 2), (F16, 2, 128, 8, 33, 1), (BF16, 5, 32, 1, 70, 1)):
        g = torch.Generator().manual_seed(heads * 7 + d)
        total = lt + li
        pe = _pe(batch, total, d, seed=d)
        qw = {s: _weights(d, dtype, seed=i) for i, s in enumerate(("txt", "img"))}
        streams = {"txt": (torch.randn(batch, lt, 3 * heads * d, generator=g) * 3).to(dtype),
                   "img": (torch.randn(batch, li, 3 * heads * d, generator=g) * 3).to(dtype)}
        shape = (batch, heads, total, d)
        q, k, v = (torch.full(shape, float("nan"), dtype=dtype) for _ in range(3))
        for name, start in (("txt", 0), ("img", lt)):
            s = streams[name]
            norm_rope_launch((s, s, s), (0, heads * d, 2 * heads * d), heads, *qw[name], eps, pe, q, k, v, start)
        for name, start, length in (("txt", 0, lt), ("img", lt, li)):
            src = streams[name].reshape(batch, length, 3, heads, d).permute(2, 0, 3, 1, 4)
            rows = pe[:, :, start:start + length]
            for part, got, w in (("q", q, qw[name][0]), ("k", k, qw[name][1])):
                ok, err = _close(got[:, :, start:start + length], _want(src[0 if part == "q" else 1], w, rows, eps))
                record(f"joint_{part}_{name}_{dtype}_d{d}", ok, max_err=err, heads=heads, tokens=length)
            record(f"joint_v_{name}_{dtype}_d{d}", torch.equal(v[:, :, start:start + length], src[2]))
        record(f"joint_rows_all_written_{dtype}_d{d}", not any(t.isnan().any() for t in (q, k, v)))


def check_norm_rope_single_block() -> None:
    """A single block's projection: q / k / v in the first ``3 H D`` columns of wider rows (the MLP's after
    them), one ``pe`` row broadcast over a batch of 2, no v written; and the norm or the rotation alone."""
    from comfyquant.runtime.kernels.triton_rope import norm_rope_launch

    heads, d, length, batch, eps = 4, 64, 41, 2, 1e-6
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(batch, length, 3 * heads * d + 96, generator=g) * 2).to(BF16)
    qkv = h[..., :3 * heads * d]
    src = qkv.reshape(batch, length, 3, heads, d).permute(2, 0, 3, 1, 4)
    pe = _pe(1, length, d, seed=5)
    qw, kw = _weights(d, BF16, seed=9)
    for label, weights, rot in (("norm_rope", (qw, kw), pe), ("norm_only", (qw, kw), None),
                                ("rope_only", (None, None), pe)):
        q, k = (torch.full((batch, heads, length, d), float("nan"), dtype=BF16) for _ in range(2))
        norm_rope_launch((h, h, h), (0, heads * d, 2 * heads * d), heads, *weights, eps, rot, q, k, None, 0)
        for part, got, w in (("q", q, weights[0]), ("k", k, weights[1])):
            want = _want(src[0 if part == "q" else 1], w, rot.expand(batch, *rot.shape[1:]) if rot is not None else None,
                         eps)
            ok, err = _close(got, want)
            record(f"single_{label}_{part}", ok, max_err=err, rel=rel(got, want))
    # a one-token pe row for every token (pe.shape[2] == 1)
    one = _pe(1, 1, d, seed=11)
    q, k = (torch.empty((batch, heads, length, d), dtype=BF16) for _ in range(2))
    norm_rope_launch((h, h, h), (0, heads * d, 2 * heads * d), heads, qw, kw, eps, one, q, k, None, 0)
    ok, err = _close(q, _want(src[0], qw, one.expand(batch, 1, length, d // 2, 2, 2), eps))
    record("single_pe_one_row", ok, max_err=err)
    # the rotation keeps each pair's norm: a check the oracle could share a mistake with
    rot_only = torch.empty((batch, heads, length, d), dtype=torch.float16)
    hh = h.half()
    norm_rope_launch((hh, hh, hh), (0, heads * d, 2 * heads * d), heads, None, None, eps, pe, rot_only,
                     torch.empty_like(rot_only), None, 0)
    pairs_in = src[0].double().reshape(batch, heads, length, -1, 2).norm(dim=-1)
    pairs_out = rot_only.double().reshape(batch, heads, length, -1, 2).norm(dim=-1)
    record("rotation_keeps_pair_norms", bool(torch.allclose(pairs_in, pairs_out, rtol=2e-3, atol=1e-3)),
           max_err=float((pairs_in - pairs_out).abs().max()), unit=math.isfinite(float(pairs_out.sum())))


def check_norm_rope_parts() -> None:
    """q, k, v from three projections (Qwen-Image's ``to_q`` / ``to_k`` / ``to_v``): the same rows as one
    projection holding all three."""
    from comfyquant.runtime.kernels.triton_rope import norm_rope_launch

    heads, d, length, eps = 3, 64, 21, 1e-6
    g = torch.Generator().manual_seed(17)
    parts = [(torch.randn(1, length, heads * d, generator=g) * 2).to(BF16) for _ in range(3)]
    joint = torch.cat(parts, -1)
    pe = _pe(1, length + 4, d, seed=2)
    qw, kw = _weights(d, BF16, seed=4)
    outs = []
    for srcs, offs in ((tuple(parts), (0, 0, 0)), ((joint,) * 3, (0, heads * d, 2 * heads * d))):
        q, k, v = (torch.full((1, heads, length + 4, d), float("nan"), dtype=BF16) for _ in range(3))
        norm_rope_launch(srcs, offs, heads, qw, kw, eps, pe, q, k, v, 4)
        outs.append((q[:, :, 4:], k[:, :, 4:], v[:, :, 4:]))
    same = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))
    src = parts[0].reshape(1, length, heads, d).transpose(1, 2)
    ok, err = _close(outs[0][0], _want(src, qw, pe[:, :, 4:], eps))
    record("parts_equal_one_projection", same)
    record("parts_q_vs_float64", ok, max_err=err)
    # Qwen-Image's forward casts EmbedND's rotations to the model's dtype: the kernel widens them as it loads them
    pe16 = pe.to(BF16)
    q, k, v = (torch.full((1, heads, length + 4, d), float("nan"), dtype=BF16) for _ in range(3))
    norm_rope_launch(tuple(parts), (0, 0, 0), heads, qw, kw, eps, pe16, q, k, v, 4)
    srck = parts[1].reshape(1, length, heads, d).transpose(1, 2)
    for name, got, s_, w in (("q", q, src, qw), ("k", k, srck, kw)):
        ok, err = _close(got[:, :, 4:], _want(s_, w, pe16[:, :, 4:], eps))
        record(f"parts_bf16_pe_{name}_vs_float64", ok, max_err=err)
    record("parts_bf16_pe_v", torch.equal(v[:, :, 4:], parts[2].reshape(1, length, heads, d).transpose(1, 2)))


def check_join_act() -> None:
    """``cat((a, act(b)))`` rows: ``a``'s columns copied bit for bit, ``b``'s through the activation within a step
    of the float64 value (the interpreter's bf16 store truncates), both halves strided, the boundary inside a
    program's block or on it, every output element written."""
    import torch.nn.functional as F

    from comfyquant.runtime.kernels.acts import INPUT_ACTS
    from comfyquant.runtime.kernels.triton_join import BLOCK, join_act_launch

    g = torch.Generator().manual_seed(21)
    for dtype, ka, kb, act in ((BF16, 100, 1500, "gelu_tanh"), (F16, BLOCK, 2 * BLOCK + 7, "gelu"),
                               (BF16, 64, 64, "silu")):
        m = 9
        wide = (torch.randn(m, ka + kb + 40, generator=g) * 3).to(dtype)
        a, b = wide[:, 3:3 + ka], wide[:, 40:40 + kb]  # strided rows, unaligned starts
        out = torch.full((m, ka + kb), float("nan"), dtype=dtype)
        join_act_launch(a, b, INPUT_ACTS[act], out)
        fn = {"gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu, "silu": F.silu}[act]
        want = fn(b.double())
        err = (out[:, ka:].double() - want).abs()
        step = 2.0 ** -(7 if dtype == BF16 else 10)  # the spacing of the dtype's values, relative
        record(f"join_{act}_{dtype}_a", torch.equal(out[:, :ka], a), ka=ka)
        record(f"join_{act}_{dtype}_b", bool((err <= step * want.abs() + 1e-3 * step).all()) and not out.isnan().any(),
               max_err=float(err.max()), kb=kb)


GROUPS = {"norm_rope": check_norm_rope, "norm_rope_single": check_norm_rope_single_block,
          "norm_rope_parts": check_norm_rope_parts, "join_act": check_join_act}
