"""GPU checks of the runtime's paths around the kernels (``check_kernels_gpu --only`` runs them): eager
plans replaying the general path bit for bit (and taking the direct TMA launch), CUDA-graph capture, layers
made under ``torch.inference_mode``, the int8 attention kernel and the cuDNN-first SDPA order, sibling
projections fused into one GEMM, and folded input activations and dynamic LoRAs in the GEMM epilogue on
every fusing backend."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from gpu_check_record import poison, record, rel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.runtime.kernels import triton_int8


def check_cuda_graphs() -> None:
    from torch import nn

    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.cuda_graphs import capture

    net = nn.Sequential(nn.Linear(3072, 3072), nn.GELU(), nn.Linear(3072, 3072)).cuda().bfloat16()
    quantize_(net, QuantizeConfig(format="int8"))
    g = capture(net)
    with torch.no_grad():
        for m in (1024, 1024, 1024, 1024, 77, 77, 77, 1024):
            x = torch.randn(m, 3072, device="cuda").bfloat16()
            # the capture picks backends by GPU time alone (another path than eager may run): both are int8
            # approximations of the same layers, each within ~1% of the float result
            e = rel(g(x), net(x))
            record("cuda_graphs_replay", e <= 0.03, m=m, graphs=g.graphs, rel=e)


def check_siblings() -> None:
    """Sibling projections as one GEMM (``runtime.siblings``) on the GPU: a T5-width attention's q / k / v
    (M 256 and 1024, int8 on the Triton / Gluon W8A8 path pinned, and the automatic backend) fused against the
    same module unfused: bit-equal with the W8A8 backend pinned (int32 sums and one epilogue per element,
    whichever tile runs), within int8 error of each other with the automatic choice (a wider N may pick
    another backend); the fused GEMM ran; the weights share one storage; and a CUDA-graph capture after the
    warm-up steps replays the fused module's output."""
    from torch import nn

    from comfyquant.runtime import QuantizeConfig, quantize_
    from comfyquant.runtime.cuda_graphs import capture
    from comfyquant.runtime.siblings import fuse_sibling_projections

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(4096, 4096, bias=False) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.q(x), self.k(x) * 0.5, self.v(x)], -1)

    for backend in ("triton", None):
        torch.manual_seed(7)
        plain = Attn().cuda().bfloat16()
        fused = Attn().cuda().bfloat16()
        fused.load_state_dict(plain.state_dict())
        for net in (plain, fused):
            quantize_(net, QuantizeConfig(format="int8", min_features=1, backend=backend))
        groups = fuse_sibling_projections(fused)
        with torch.no_grad():
            for m in (256, 1024):
                x = torch.randn(1, m, 4096, device="cuda").bfloat16()
                want = plain(x)
                for _ in range(3):  # an observed round, then fused rounds
                    got = fused(x)
                group = fused.q.sibling[0]
                shared = fused.q.weight.qdata.untyped_storage().data_ptr() == \
                    fused.v.weight.qdata.untyped_storage().data_ptr()
                ok = (torch.equal(got, want) if backend else rel(got, want) < 0.02) and group.fused_calls >= 2
                record("siblings_fused", ok and shared and groups == [": q,k,v"], m=m, backend=str(backend),
                       fused_calls=group.fused_calls, shared=shared, rel=rel(got, want))
            # dynamic LoRAs on q and v: one stacked low-rank term in the fused GEMM's epilogue (not yet run on
            # a GPU when written: the tenth session's device time was spent)
            from comfyquant.lora.sidepath import LoRASidePath, SideEntry

            for name in ("q", "v"):
                side = LoRASidePath()
                side.add(1, SideEntry(down=(torch.randn(16, 4096, device="cuda") * 0.02).bfloat16(),
                                      up=(torch.randn(4096, 16, device="cuda") * 0.02).bfloat16()))
                getattr(fused, name).adapter, getattr(plain, name).adapter = side, side.copy()
            x = torch.randn(1, 1024, 4096, device="cuda").bfloat16()
            want = plain(x)
            for _ in range(2):
                got = fused(x)
            term = getattr(fused.q.sibling[0], "_term", None)
            record("siblings_lora_term", term is not None and rel(got, want) < 0.01, backend=str(backend),
                   rel=rel(got, want))
            for name in ("q", "v"):
                getattr(fused, name).adapter = getattr(plain, name).adapter = None
            g = capture(fused)
            x = torch.randn(1, 256, 4096, device="cuda").bfloat16()
            outs = [g(x) for _ in range(4)]  # two eager warm-up calls, then capture and replay
            want = fused(x)
            e = max(rel(o, want) for o in outs)
            record("siblings_cuda_graphs", e <= (0.0 if backend else 0.02), backend=str(backend), graphs=g.graphs,
                   rel=e)


def check_low_rank_epilogue() -> None:
    """Dynamic LoRAs added in the GEMM epilogue (every fusing backend, TMA and pointer W8A8 paths included):
    the layer with its side path equals the same backend without it plus the float64 low-rank term."""
    from comfyquant.lora.sidepath import LoRASidePath, SideEntry
    from comfyquant.runtime import QuantizedTensor, QuantLinear
    from comfyquant.runtime.nn import linear

    cases = {"int8": ("triton", "triton_fused", "triton_w8a16", "dequant"), "int8-rot": ("triton", "triton_w8a16"),
             "fp8": ("triton", "triton_w8a16", "scaled_mm"), "int4-rot": ("triton",)}
    for m, k, n, rank in [(5, 3072, 3072, 32), (300, 3072, 9216, 20), (4096, 3072, 3072, 96), (70, 200, 70, 8)]:
        w = torch.randn(n, k, device="cuda") * 0.03
        x = torch.randn(m, k, device="cuda").bfloat16()
        bias = torch.randn(n, device="cuda").bfloat16()
        side = LoRASidePath()
        d = (torch.randn(rank, k, device="cuda") * 0.05).bfloat16()  # a term that is ~5-10% of the output
        u = (torch.randn(n, rank, device="cuda") * 0.05).bfloat16()
        side.add(1, SideEntry(down=d, up=u))
        term = (x.double() @ d.double().t()) @ u.double().t()
        for fmt, backends in cases.items():
            if k % 128 and fmt in ("int8-rot", "int4-rot"):
                continue
            lin = QuantLinear(k, n, weight=QuantizedTensor.from_float(w.bfloat16(), fmt))
            lin.bias = torch.nn.Parameter(bias, requires_grad=False)
            for backend in backends:
                if backend == "scaled_mm" and (k % 16 or n % 16):  # refused with a UserError (its own test)
                    continue
                lin.set_backend(backend)
                with torch.no_grad():
                    plain = linear(x, lin.qweight, lin.bias).double()
                    lin.adapter = side
                    y = lin(x)
                    lin.adapter = None
                e = rel(y, plain + term)
                record(f"low_rank_{fmt}_{backend}", bool(torch.isfinite(y).all()) and e <= 2**-7, m=m, k=k, n=n,
                       rank=rank, rel=e)


def check_input_act() -> None:
    """Folded input activations (every fusing backend; the gated swiglu / geglu / gated_gelu_tanh: the quantizers
    fuse them, the others apply them first): the layer with ``input_act`` equals the same backend on the
    activation computed by torch first (which rounds it to bf16; the kernels keep it in fp32)."""
    from comfyquant.runtime import QuantizedTensor, QuantLinear
    from comfyquant.runtime.kernels.acts import GATED, apply_input_act
    from comfyquant.runtime.nn import linear

    cases = {"int8": ("triton", "triton_fused", "triton_w8a16", "dequant"), "int8-rot": ("triton", "triton_w8a16"),
             "fp8": ("triton", "triton_w8a16", "scaled_mm"), "int4-rot": ("triton",)}
    for m, k, n in [(5, 3072, 3072), (300, 12288, 3072), (4096, 3072, 3072), (70, 200, 70)]:
        w = torch.randn(n, k, device="cuda") * 0.03
        x2 = (torch.randn(m, 2 * k, device="cuda") * 2).bfloat16()  # a gated activation reads both halves
        for act in ("gelu_tanh", "silu", "swiglu", "geglu", "gated_gelu_tanh"):
            x = x2 if act in GATED else x2[:, :k].contiguous()
            xa = apply_input_act(x, act)
            for fmt, backends in cases.items():
                if k % 128 and fmt in ("int8-rot", "int4-rot"):
                    continue
                lin = QuantLinear(k, n, bias=False, weight=QuantizedTensor.from_float(w.bfloat16(), fmt))
                exact = apply_input_act(x.double(), act) @ lin.qweight.dequantize().double().t()
                for backend in backends:
                    if backend == "scaled_mm" and (k % 16 or n % 16):
                        continue
                    lin.set_backend(backend)
                    with torch.no_grad():
                        want = linear(xa, lin.qweight, None)
                        lin.input_act = act
                        y = lin(x)
                        lin.input_act = None
                    e = rel(y, want)
                    # paths that quantize activations (fp8 W8A8): a bf16 rounding of act(x) moves some values
                    # across fp8 rounding boundaries, so the two differ by about the format's own error; the
                    # folded one must then be no worse against the float64 truth than the unfolded one
                    e_fold, e_plain = rel(y, exact), rel(want, exact)
                    ok = e <= 2**-7 or e_fold <= 1.05 * e_plain
                    record(f"input_act_{act}_{fmt}_{backend}", bool(torch.isfinite(y).all()) and ok, m=m, k=k,
                           n=n, rel=e, rel_folded_vs_f64=e_fold, rel_unfolded_vs_f64=e_plain)


def check_plans() -> None:
    """Eager fast paths (``triton_plans``): a layer's first call of a signature takes the general path, later
    ones replay its kernels through the C launchers; the replay of the first input equals the first result bit
    for bit (same kernels), after other inputs ran in between; with and without a dynamic LoRA."""
    from comfyquant.lora.sidepath import LoRASidePath, SideEntry
    from comfyquant.runtime import QuantizedTensor, QuantLinear
    from comfyquant.runtime.nn import bound_linear

    cases = {"int8": ("triton", "triton_fused", "triton_fused_kblock", "triton_w8a16", "dequant"),
             "int8-rot": ("triton", "triton_w8a16", "dequant"),
             "fp8": ("triton_w8a16", "dequant", "scaled_mm", "triton"),
             "int4-rot": ("triton",), "fp8-static": ("triton",), "int8-block": ("dequant",)}
    # (4,096 and 2,048 rows: the convrot layers' activation pass on the one-read rotating kernel)
    for m, k, n in [(1, 3072, 3072), (300, 3072, 9216), (4096, 3072, 3072), (2048, 1280, 1280), (70, 200, 70)]:
        w = torch.randn(n, k, device="cuda") * 0.03
        bias = torch.randn(n, device="cuda").bfloat16()
        lead = (3, 100) if m == 300 else (m,)  # leading dims as models hand them over: plans make no views
        xs = [torch.randn(*lead, k, device="cuda").bfloat16() for _ in range(2)]
        side = LoRASidePath()
        side.add(1, SideEntry(down=(torch.randn(24, k, device="cuda") * 0.05).bfloat16(),
                              up=(torch.randn(n, 24, device="cuda") * 0.05).bfloat16()))
        for fmt, backends in cases.items():
            if k % 128 and fmt in ("int8-rot", "int4-rot"):
                continue
            # (fp8-static: a stored static activation scale, as calibrated fp8 checkpoints carry)
            qw = (QuantizedTensor.from_float(w.bfloat16(), "fp8", input_scale=0.02) if fmt == "fp8-static"
                  else QuantizedTensor.from_float(w.bfloat16(), fmt))
            lin = QuantLinear(k, n, weight=qw)
            lin.bias = torch.nn.Parameter(bias, requires_grad=False)
            for backend in backends:
                if backend == "scaled_mm" and (k % 16 or n % 16):
                    continue
                lin.set_backend(backend)
                for lora in (False, True):
                    lin.adapter = side if lora else None
                    with torch.no_grad():
                        first = lin(xs[0])  # general path (compiles)
                        lin(xs[1])
                        again = lin(xs[0])  # the plan, when there is one
                    lin.adapter = None
                    memo = getattr(bound_linear(lin.qweight, lin.bias), "memo", {})
                    planned = any(callable(e[1]) for sig, e in memo.items() if (sig[-1] > 0) == lora)
                    # (a rotated layer's weight-only / dequantizing plan carries no low-rank term: general path)
                    fuses = (backend not in ("dequant", "scaled_mm") and not (fmt == "int8-rot" and backend != "triton")
                             and fmt != "int4-rot")
                    same = torch.equal(first, again)
                    record(f"plan_{fmt}_{backend}{'_lora' if lora else ''}", same and (planned or (lora and not fuses)),
                           m=m, k=k, n=n, planned=planned, same=same)
    # every TMA plan made above took the direct launch (descriptors expanded by the plan, Triton's wrapper
    # skipped): a disagreement falls back to Triton's launch silently but for one log line, and costs host time
    kernels = {"w8a8_tma": triton_int8._TMA, "w8a8_tma_persistent": triton_int8._TMA_PERSISTENT}
    if triton_int8.ws_available() and torch.cuda.get_device_capability()[0] == 9:
        kernels["w8a8_ws"] = triton_int8._ws_kernel()
    for name, fk in kernels.items():
        record(f"plan_direct_launch_{name}", all(fk.direct_checked.values()), keys=len(fk.direct_checked),
               disagreed=sum(not v for v in fk.direct_checked.values()))


def check_inference_mode() -> None:
    """Layers made and run under ``torch.inference_mode`` (as ComfyUI executes nodes: weights, scales and
    plans are inference tensors), every backend's general path and plan: equal to the same layer made and run
    under ``no_grad``. The fp8 plan once read the scale's version counter and raised there."""
    from comfyquant.runtime import QuantizedTensor, QuantLinear

    k, n = 3072, 3072
    w = torch.randn(n, k, device="cuda") * 0.03
    bias = torch.randn(n, device="cuda").bfloat16()
    xs = [torch.randn(m, k, device="cuda").bfloat16() for m in (1, 300, 300, 4096, 4096)]
    for fmt, backends in {"int8": ("triton", "triton_fused", "triton_w8a16", "dequant"),
                          "fp8": ("triton_w8a16", "dequant", "scaled_mm", "triton")}.items():
        for backend in backends:
            outs = {}
            for mode in ("no_grad", "inference"):
                ctx = torch.inference_mode() if mode == "inference" else torch.no_grad()
                try:
                    with ctx:
                        lin = QuantLinear(k, n, weight=QuantizedTensor.from_float(w.bfloat16(), fmt))
                        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
                        lin.set_backend(backend)
                        outs[mode] = [lin(x) for x in xs]  # the second of each size replays the plan
                except RuntimeError as e:
                    outs[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            ok = all(isinstance(o, list) for o in outs.values()) and all(
                torch.equal(a, b) for a, b in zip(outs["no_grad"], outs["inference"], strict=True))
            record(f"inference_mode_{fmt}_{backend}", ok,
                   error=next((o for o in outs.values() if isinstance(o, str)), None))


def check_attention() -> None:
    """The int8 attention kernel (``triton_attention``) against fp32 SDPA, bf16 inputs laid out as models pass
    them (``[B, T, H, D]`` viewed as ``[B, H, T, D]``), ragged token counts, cross-attention; p and v in bf16
    (measured 1.3% error on random inputs) and in fp8 (3.9%)."""
    import torch.nn.functional as F

    from comfyquant.runtime.kernels import triton_attention as ta

    for b, h, t, tk, d in [(1, 24, 4608, 4608, 128), (2, 10, 1000, 77, 64), (1, 8, 333, 333, 128)]:
        q = torch.randn(b, t, h, d, device="cuda").bfloat16().transpose(1, 2)
        k = (torch.randn(b, tk, h, d, device="cuda") + torch.randn(d, device="cuda")).bfloat16().transpose(1, 2)
        v = torch.randn(b, tk, h, d, device="cuda").bfloat16().transpose(1, 2)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        for pv_fp8, bound in ((False, 2.5e-2), (True, 6e-2)):
            poison()
            y = ta.int8_attention(q, k, v, pv_fp8=pv_fp8)
            err = float((y.float() - ref).norm() / ref.norm())
            record(f"attention{'_fp8pv' if pv_fp8 else ''}", bool(torch.isfinite(y).all()) and err <= bound
                   and y.shape == q.shape and y.transpose(1, 2).is_contiguous(), shape=(b, h, t, tk, d), err=err)


def check_attention_cudnn() -> None:
    """The ``cudnn_first`` scope inside ComfyUI-style backend ordering (FlashAttention-2 first, as ComfyUI 0.30
    sets it): the call runs on cuDNN's kernel (profiler kernel names), is counted, and stays exact bf16 attention;
    ``quantize=False`` routes nothing to the int8 kernel even for a long sequence."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from comfyquant.runtime.attention import AttentionPolicy, QuantizedAttention

    comfy_order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]
    q, k, v = (torch.randn(1, 24, 4608, 128, device="cuda").bfloat16() for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    for cudnn_first in (False, True):
        policy = AttentionPolicy(min_tokens=1024, quantize=False, cudnn_first=cudnn_first)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            with QuantizedAttention(policy) as mode, sdpa_kernel(comfy_order, set_priority=True):
                y = F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
        names = " ".join(e.key.lower() for e in prof.key_averages())
        err = rel(y, ref)
        on_cudnn = "cudnn" in names
        record("attention_cudnn_first" if cudnn_first else "attention_comfy_order", err <= 1e-2 and mode.routed == 0
               and on_cudnn is cudnn_first and mode.cudnn == int(cudnn_first), err=err, cudnn_kernel=on_cudnn)
