"""GPU checks of the GEMM kernels (``check_kernels_gpu --only`` runs them): the int32 GEMM against
``torch._int_mm``, the persistent-grid and warp-specialized (Gluon) W8A8 / fp8 GEMMs bit-equal to the
one-program-per-tile kernel with the same tile, and the Gluon kernel's LoRA epilogue through the dispatcher."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from gpu_check_record import poison, record, rel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, run from anywhere

from comfyquant.runtime.kernels import reference, triton_int8, triton_quant


def check_int_mm_exact() -> None:
    for m, k, n in [(1, 3072, 3072), (16, 64, 48), (17, 100, 70), (300, 5120, 1280), (4096, 3072, 3072),
                    (129, 13824, 520), (2, 15360, 3072)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
        want = reference.int_mm(a, b.t())
        for tma in (False, True) if k % 16 == 0 else (False,):
            got = triton_int8.int_mm(a, b, tma=tma)
            record("int32_gemm_bit_exact", torch.equal(got, want), m=m, k=k, n=n, tma=tma)


def w8a8_operands(m: int, k: int, n: int, row_sb: bool = True) -> tuple[torch.Tensor, ...]:
    """Random int8 A ``[m, k]`` and B ``[n, k]`` with per-row scales of A and per-row (or one) scales of B."""
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    return a, b, torch.rand(m, 1, device="cuda") * 1e-3, torch.rand(n if row_sb else 1, device="cuda") * 1e-3


def lora_case(m: int, k: int, n: int, r: int, dt: torch.dtype) -> dict:
    """A LoRA'd int8 W8A8 problem: x, its per-row codes ``a`` / ``sa``, int8 weights, bias, a rank-``r`` term
    (``down``, ``up``, the runtime's ``lr`` arguments with ``h = x @ down^T``), the Triton kernel's fused term on
    the Gluon tile (``want``: the per-tile kernel, the reference path) and the float64 result of the same codes."""
    import dataclasses

    from comfyquant.runtime.kernels.configs import WS_W8A8

    x = torch.randn(m, k, device="cuda").to(dt)
    a, sa = triton_quant.quantize_rows_int8(x)
    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    sb = torch.rand(n, device="cuda") * 1e-4
    bias = torch.randn(n, device="cuda").to(dt)
    down = (torch.randn(r, k, device="cuda") * 0.05).to(dt)
    up = (torch.randn(r, n, device="cuda") * 0.05).to(dt)
    lr = triton_int8._low_rank_args((down, up), x, sb)
    want = triton_int8.gemm_w8a8(a, sa, w_q, sb, bias, dt, cfg=dataclasses.replace(WS_W8A8, persistent=0), lr=lr)
    h = lr[0][0]
    ref = (a.double() @ w_q.double().T) * sa.double() * sb.double() + bias.double() + h.double() @ up.double()
    return {"x": x, "a": a, "sa": sa, "w_q": w_q, "sb": sb, "bias": bias, "down": down, "up": up, "lr": lr,
            "h": h, "want": want, "ref": ref}


def check_persistent() -> None:
    import dataclasses

    from comfyquant.runtime.kernels.configs import PERSISTENT_W8A8

    for m, k, n in [(4096, 3072, 9216), (4097, 5120, 5120), (1024, 3072, 21504), (16384, 1280, 1280),
                    (300, 12288, 3072)]:
        a, b, sa, sb = w8a8_operands(m, k, n)
        bias = torch.randn(n, device="cuda").bfloat16()
        pick = triton_int8.pick_w8a8(m, n, k, a.device, True)[0]
        for base in {pick, PERSISTENT_W8A8}:
            want = triton_int8.gemm_w8a8(a, sa, b, sb, bias, torch.bfloat16, cfg=dataclasses.replace(base, persistent=0))
            for mode in (1, 2):
                poison()
                cfg = dataclasses.replace(base, persistent=mode)
                got = triton_int8.gemm_w8a8(a, sa, b, sb, bias, torch.bfloat16, cfg=cfg)
                record("w8a8_persistent_bit_equal", torch.equal(got, want), m=m, k=k, n=n, cfg=str(cfg))
        auto = triton_int8.gemm_w8a8(a, sa, b, sb, bias, torch.bfloat16)  # the pick (persistent where it applies)
        record("w8a8_pick_bit_equal", torch.equal(auto, triton_int8.gemm_w8a8(
            a, sa, b, sb, bias, torch.bfloat16, cfg=dataclasses.replace(pick, persistent=0))), m=m, k=k, n=n,
            pick=str(pick))


def _ws_against_per_tile(check: str, a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                         bias: torch.Tensor | None, dt: torch.dtype, sms: int, **info: object) -> None:
    """Record ``check``: the Gluon GEMM on ``ws_config``'s tile (``WS_W8A8`` from 1,024 rows) bit-equal to the
    per-tile Triton TMA kernel on the same tile, and within 4e-3 of float64 (int8 or fp8 operands)."""
    import dataclasses

    from comfyquant.runtime.kernels.configs import WS_W8A8, ws_config

    m, k, n = a.shape[0], a.shape[1], b.shape[0]
    tile = ws_config(m, n, sms) if m < 1024 else WS_W8A8
    per_tile = dataclasses.replace(tile, persistent=0, stages=triton_int8.launch_stages(tile))
    want = triton_int8.gemm_w8a8(a, sa, b, sb, bias, dt, cfg=per_tile)
    poison()
    got = triton_int8.gemm_w8a8(a, sa, b, sb, bias, dt, cfg=tile)
    ref = (a.double() @ b.double().T) * sa.double() * sb.double().reshape(1, -1) + (
        bias.double() if bias is not None else 0)
    err = rel(got, ref)
    record(check, torch.equal(got, want) and err < 4e-3, m=m, k=k, n=n, err=err,
           max_diff=float((got.float() - want.float()).abs().max()),
           tile=f"{tile.block_m}x{tile.block_n} s{tile.stages}", **info)


def check_ws_gemm() -> None:
    """The warp-specialized Gluon GEMM (``configs.ws_config``'s tiles: 128x128, and 128x64 below 1,024 rows)
    bit-equal to the per-tile Triton TMA kernel with the same tile: ragged M / N / K (K not a multiple of the
    128-wide K step: TMA zero-fills), a scalar weight scale, no bias, fp16 output, SDXL widths; and the
    automatic pick from ``WS_MIN_M`` rows is the Gluon kernel, with ``ws_config``'s tile, exactly on the shapes
    ``configs.ws_shape`` gives it."""
    from comfyquant.runtime.kernels.configs import WS_MIN_M, ws_config, ws_shape

    for m, k, n, row_sb, has_bias, dt in [(4608, 3072, 3072, True, True, torch.bfloat16),
                                          (1000, 15360, 520, True, False, torch.bfloat16),
                                          (2049, 3136, 9216, False, True, torch.float16),
                                          (16384, 5120, 13824, True, True, torch.bfloat16),
                                          (1024, 4096, 4096, True, True, torch.float32),  # T5 in ComfyUI: fp32
                                          (4096, 1280, 1280, True, True, torch.bfloat16),  # SDXL widths (run 29)
                                          (1024, 640, 640, True, False, torch.bfloat16),  # 40 tiles: Triton
                                          (256, 3072, 3072, True, True, torch.bfloat16),  # 128x64 (run 31)
                                          (300, 12288, 3136, True, True, torch.bfloat16),  # ragged, 128x64
                                          (512, 5120, 5120, False, False, torch.float16),  # 128x64
                                          (256, 5120, 1280, True, True, torch.bfloat16),  # 40 tiles: Triton
                                          (256, 4096, 4096, True, True, torch.float32)]:  # 128x64 on Triton
        a, b, sa, sb = w8a8_operands(m, k, n, row_sb)
        bias = torch.randn(n, device="cuda").to(dt) if has_bias else None
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count
        _ws_against_per_tile("w8a8_ws_bit_equal", a, sa, b, sb, bias, dt, sms, row_sb=row_sb, bias=has_bias,
                             dtype=str(dt))
        if m >= WS_MIN_M:
            pick = triton_int8.pick_w8a8(m, n, k, a.device, True)[0]
            want_pick = ws_config(m, n, sms) if ws_shape(m, n, k, sms) else None
            record("w8a8_ws_picked", pick == want_pick if want_pick else pick.persistent != 3, m=m, k=k, n=n,
                   pick=str(pick))


def check_ws_lora_wired() -> None:
    """A LoRA'd W8A8 layer as the runtime runs it (``int8_linear`` with a low-rank term, no config given): from
    ``WS_MIN_M`` rows it picks the Gluon kernel with the term in its epilogue (``configs.WS_LOW_RANK``), as
    accurate against float64 as the Triton kernel's fused term on the same tile; a rank past 64 keeps the Triton
    kernel (a float32 term does too: CPU test ``test_a_lora_term_takes_the_gluon_kernel_only_where...``)."""
    from comfyquant.runtime.kernels.configs import WS_LOW_RANK

    for m, k, n, r, dt in [(4096, 3072, 3072, 32, torch.bfloat16), (16384, 3072, 12288, 64, torch.bfloat16),
                           (2049, 5120, 13824, 16, torch.float16), (4096, 3072, 3072, 96, torch.bfloat16),
                           (256, 3072, 9216, 32, torch.bfloat16)]:  # 128x64 with the term (run 31)
        c = lora_case(m, k, n, r, dt)
        lr = c["lr"]
        picked = triton_int8.pick_w8a8(m, n, k, c["x"].device, triton_int8.persistent_eligible(torch.int8, False, lr),
                                       triton_int8.ws_eligible(torch.int8, False, lr))[0]
        poison()
        got = triton_int8.int8_linear(c["x"], c["w_q"], c["sb"], c["bias"], None, dt, low_rank=(c["down"], c["up"], r))
        err, err_t = rel(got, c["ref"]), rel(c["want"], c["ref"])
        expect_ws = WS_LOW_RANK and r <= 64
        record("w8a8_ws_lora_wired", (picked.persistent == 3) == expect_ws and bool(torch.isfinite(got).all())
               and err <= 1.5 * err_t + 1e-4, m=m, k=k, n=n, r=r, dtype=str(dt), picked=str(picked), err=err,
               triton_err=err_t)


def check_ws_experimental() -> None:
    """The Gluon GEMM's variants the runtime does not pick, and its LoRA term launched directly (run last: a variant
    that hangs costs only the end of the step): ping-pong (whole tiles per consumer warp group, in turns) bit-equal
    to the Triton kernel with the same tile, and a LoRA's low-rank term in its epilogue with both schedules, against
    the Triton kernels and float64 (fp8 operands, a runtime pick since ``configs.WS_FP8``: :func:`check_ws_fp8`)."""
    import dataclasses

    from comfyquant.runtime.kernels.configs import WS_W8A8
    from comfyquant.runtime.kernels.gluon_gemm import gluon_w8a8

    per_tile = dataclasses.replace(WS_W8A8, persistent=0)  # the same tile on the per-tile Triton kernel
    for m, k, n, dt in [(4608, 3072, 3072, torch.bfloat16), (1000, 15360, 520, torch.float16),
                        (2049, 3136, 9216, torch.bfloat16)]:
        a, b, sa, sb = w8a8_operands(m, k, n)
        bias = torch.randn(n, device="cuda").to(dt)
        want = triton_int8.gemm_w8a8(a, sa, b, sb, bias, dt, cfg=per_tile)
        poison()
        pp = gluon_w8a8(a, sa, b, sb, bias, dt, block_n=128, stages=4, pingpong=True)
        record("w8a8_ws_pingpong_bit_equal", torch.equal(pp, want), m=m, k=k, n=n, dtype=str(dt))
    # a dynamic LoRA's low-rank term in the epilogue (ranks 16-64, padded to 16 as the runtime pads them; the box
    # zero-fills past the rank), both schedules, against the Triton kernel's fused term (same tile) and float64
    for m, k, n, r, pingpong in [(4608, 3072, 3072, 32, False), (2049, 3136, 9216, 64, False),
                                 (1000, 5120, 520, 16, True), (4096, 3072, 3072, 48, True)]:
        c = lora_case(m, k, n, r, torch.bfloat16)
        poison()
        got = gluon_w8a8(c["a"], c["sa"], c["w_q"], c["sb"], c["bias"], block_n=128, stages=5, pingpong=pingpong,
                         low_rank=(c["h"], c["up"]))
        err, err_t = rel(got, c["ref"]), rel(c["want"], c["ref"])
        record("w8a8_ws_low_rank", bool(torch.isfinite(got).all()) and err <= 1.5 * err_t + 1e-4, m=m, k=k, n=n,
               r=r, pingpong=pingpong, err=err, triton_err=err_t,
               bit_equal_to_triton=bool(torch.equal(got, c["want"])))


def check_ws_fp8() -> None:
    """fp8 operands on the Gluon GEMM (``configs.WS_FP8``: each K step's wgmma sums promoted into float32 by the
    kernel, ``gluon_gemm._mainloop_promoted``) bit-equal to the per-tile Triton fp8 kernel on the same tile (its
    ``max_num_imprecise_acc = BLOCK_K`` promotes the same sums in the same order): e4m3 and e5m2, one / two /
    three K steps and ragged K, 128x64 tiles below 1,024 rows, a scalar weight scale, fp16 output; a LoRA's term
    in its epilogue against float64; and ``fp8_linear`` as the runtime calls it picks it where ``ws_shape`` says."""
    import dataclasses

    from comfyquant.runtime.kernels.configs import WS_FP8, ws_shape

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m, k, n, fp8, row_sb, has_bias, dt in [
            (4608, 3072, 3072, torch.float8_e4m3fn, True, True, torch.bfloat16),
            (1000, 15360, 520, torch.float8_e4m3fn, True, False, torch.float16),
            (2049, 3136, 9216, torch.float8_e5m2, False, True, torch.bfloat16),  # 24.5 K steps, one scale
            (256, 3072, 3072, torch.float8_e4m3fn, True, True, torch.bfloat16),  # 128x64
            (1024, 128, 1024, torch.float8_e4m3fn, True, True, torch.bfloat16),  # one K step
            (1024, 256, 1024, torch.float8_e5m2, True, True, torch.bfloat16),  # two
            (1100, 384, 1040, torch.float8_e4m3fn, True, False, torch.bfloat16)]:  # three, ragged M / N
        a = (torch.randn(m, k, device="cuda") * 2).to(fp8)
        b = (torch.randn(n, k, device="cuda") * 2).to(fp8)
        sa, sb = torch.rand(m, 1, device="cuda") * 1e-2, torch.rand(n if row_sb else 1, device="cuda") * 1e-2
        bias = torch.randn(n, device="cuda").to(dt) if has_bias else None
        _ws_against_per_tile("w8a8_ws_fp8_bit_equal", a, sa, b, sb, bias, dt, sms, dtype=str(fp8), row_sb=row_sb,
                             out=str(dt))
    # the runtime's own call: per-row fp8 activations, then the Gluon kernel where ws_shape gives it the shape
    for m, k, n, r in [(4096, 3072, 3072, 0), (4096, 3072, 12288, 0), (300, 5120, 5120, 0), (4096, 3072, 3072, 32),
                       (1024, 640, 640, 0)]:  # 40 tiles: the Triton kernel
        x = torch.randn(m, k, device="cuda").bfloat16()
        w = torch.randn(n, k, device="cuda") * 0.02
        sw = w.abs().amax() / 448.0
        w8 = (w / sw).to(torch.float8_e4m3fn)
        bias = torch.randn(n, device="cuda").bfloat16()
        term = None
        if r:
            down = (torch.randn(r, k, device="cuda") * 0.02).bfloat16()
            up = (torch.randn(r, n, device="cuda") * 0.02).bfloat16()
            term = (down, up, r)
        q, s_x = triton_quant.quantize_rows_fp8(x, w8.dtype, None)
        lr = triton_int8._low_rank_args(term, x, sw.reshape(1))
        pick = triton_int8.pick_w8a8(m, n, k, x.device, False, triton_int8.ws_eligible(w8.dtype, False, lr))[0]
        poison()
        got = triton_int8.fp8_linear(x, w8, sw, bias, None, torch.bfloat16, low_rank=term)
        per_tile = dataclasses.replace(pick, persistent=0, stages=triton_int8.launch_stages(pick))
        want = triton_int8.fp8_linear(x, w8, sw, bias, None, torch.bfloat16, cfg=per_tile, low_rank=term)
        ref = (q.double() @ w8.double().T) * s_x.double() * sw.double() + bias.double()
        if r:
            ref = ref + (x.double() @ down.double().T) @ up.double()
        err, err_t = rel(got, ref), rel(want, ref)
        expect = WS_FP8 and ws_shape(m, n, k, sms)
        record("fp8_linear_ws_picked", (pick.persistent == 3) == expect and bool(torch.isfinite(got).all())
               and (torch.equal(got, want) if not r else err <= 1.5 * err_t + 1e-4), m=m, k=k, n=n, r=r,
               pick=f"{pick.block_m}x{pick.block_n} p{pick.persistent}", err=err, triton_err=err_t)


def _record_backend_and_plan(name: str, backend: str, x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                             bias: torch.Tensor | None, want: torch.Tensor, **info: object) -> None:
    """Record ``name``: the int8 ``backend`` pinned in a bound layer gives ``want`` on its first call (the general
    launch) and on a later one, which its plan takes."""
    from comfyquant.runtime.kernels.dispatch import bind_linear

    call = bind_linear("int8", w, (ws,), bias, backend=backend)
    first, later = call(x), call(x)
    planned = callable(next(iter(call.memo.values()))[1])
    record(name, torch.equal(first, want) and torch.equal(later, want) and planned, **info, planned=planned)


def check_resident() -> None:
    """The resident one-launch W8A8 kernel (``gluon_resident``, backend ``triton_resident``): bit-equal to the
    two-launch path (the activation quantizer's codes, then the W8A8 GEMM) on SDXL / CLIP / Flux widths with
    ragged M, a scalar weight scale, no bias and fp16; the pinned backend's first call and its plan (later
    calls) give the same; every configuration ``resident_config`` picks, and the other row block."""
    import dataclasses

    from comfyquant.runtime.kernels import gluon_resident as gr
    from comfyquant.runtime.kernels.configs import HOPPER_SMEM, resident_smem

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m, k, n, row_sb, has_bias, dt in [(4096, 640, 640, True, True, torch.bfloat16),
                                          (16384, 1280, 1280, True, True, torch.bfloat16),
                                          (1000, 768, 768, True, False, torch.float16),
                                          (4099, 768, 3072, False, True, torch.bfloat16),
                                          (1024, 3072, 768, True, True, torch.bfloat16),
                                          (77, 1280, 1280, True, True, torch.bfloat16),
                                          (256, 3072, 3072, True, True, torch.float16)]:
        x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 4).to(dt)
        x[0, 5] = 90.0
        if m > 2:
            x[1] = 0
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        ws = torch.rand(n if row_sb else 1, device="cuda") * 1e-2
        bias = torch.randn(n, device="cuda").to(dt) if has_bias else None
        q, s = triton_quant.quantize_rows_int8(x, None)
        want = triton_int8.gemm_w8a8(q, s, w, ws, bias, dt)
        cfg = gr.resident_config(m, n, k, sms)
        other = dataclasses.replace(cfg, block_m=192 - cfg.block_m)
        for c in (cfg, other):
            if resident_smem(c.block_m, c.block_n, c.block_k, c.stages, k) > HOPPER_SMEM:
                continue
            got = gr.resident_w8a8(x, w, ws, bias, cfg=c)
            record("resident_bit_equal", torch.equal(got, want), m=m, k=k, n=n, cfg=str(c), dtype=str(dt))
        _record_backend_and_plan("resident_backend_and_plan", "triton_resident", x, w, ws, bias, want, m=m, k=k, n=n)


def check_resident_ws() -> None:
    """The warp-specialized resident kernel (``gluon_resident_ws``: a quantizer partition, a TMA weight loader and
    two consumer warp groups of 64 rows overlapping within a program) bit-equal to the two-launch path (the
    activation quantizer's codes, then the W8A8 GEMM) on SDXL / CLIP widths up to SDXL attn 1,280 (64-wide tiles):
    ragged M (a partial row block; 77 rows: the second warp group's rows partly past M; 40: all past M), fp16
    without bias, row-wise and scalar weight scales, on ``resident_ws_config``'s launch and on launches the bench
    times beside it (the other tile width, other splits, a 3-deep ring); each through its general launch and its
    plan (``plan_resident_ws``: the descriptors expanded by us, the output's per buffer); on its default launches,
    the pinned backend ``triton_resident_ws`` too (its first call, then its plan)."""
    from comfyquant.runtime.kernels import gluon_resident_ws as grw
    from comfyquant.runtime.kernels.configs import ResidentConfig

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m, k, n, has_bias, dt, cfg in [
            (4096, 640, 640, True, torch.bfloat16, None), (16384, 640, 640, True, torch.bfloat16, None),
            (1000, 768, 768, False, torch.float16, None), (77, 768, 768, True, torch.bfloat16, None),
            (40, 640, 640, True, torch.bfloat16, None), (4096, 1280, 1280, True, torch.bfloat16, None),
            (300, 1280, 1280, False, torch.float16, None),
            (4096, 640, 640, True, torch.bfloat16, ResidentConfig(128, 128, 128, 4, 2)),
            (2000, 768, 768, True, torch.bfloat16, ResidentConfig(128, 64, 128, 3, 3))]:
        x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 4).to(dt)
        x[0, 5] = 90.0
        x[1] = 0
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        bias = torch.randn(n, device="cuda").to(dt) if has_bias else None
        q, s = triton_quant.quantize_rows_int8(x, None)
        for row_sb in (True, False):
            ws = torch.rand(n if row_sb else 1, device="cuda") * 1e-2
            want = triton_int8.gemm_w8a8(q, s, w, ws, bias, dt)
            poison()
            got = grw.resident_ws_w8a8(x, w, ws, bias, cfg=cfg)
            info = dict(m=m, k=k, n=n, row_sb=row_sb, bias=has_bias, dtype=str(dt),
                        cfg=str(cfg or grw.resident_ws_config(m, n, k, sms)))
            record("resident_ws_bit_equal", torch.equal(got, want), **info,
                   max_diff=float((got.float() - want.float()).abs().max()))
            plan = grw.plan_resident_ws(x, w, ws, bias, dt, cfg=cfg)  # the direct launch, as a runtime plan's
            poison()
            record("resident_ws_plan", plan is not None and torch.equal(plan(x), want), **info,
                   planned=plan is not None)
            if cfg is None and row_sb:
                _record_backend_and_plan("resident_ws_backend_and_plan", "triton_resident_ws", x, w, ws, bias, want,
                                         **info)
