"""The cooperative one-launch W8A8 kernel (``kernels.triton_coop``) compiled for sm_90 here, without a GPU, with
the launch arguments the runtime builds and Triton's own specialization (16-byte aligned pointers and sizes):
the grid barrier is the atomics it is meant to be (arrival acq_rel, the generation bump a release, the polls
acquire loads, all at GPU scope), the GEMM phase streams its tiles through cp.async (L2, never a stale L1 line),
the launch is cooperative, and ptxas finds no spills. Its results are checked under the interpreter
(``triton_interp_coop``, one program) and on an H200 (``check_kernels_gpu.check_coop``, up to 132 programs)."""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")


def _compile(m: int, n: int, k: int, lora: bool = False) -> object:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from comfyquant.runtime.kernels import triton_coop as tc
    from comfyquant.runtime.kernels import triton_int8 as ti

    x, q, s = torch.zeros(m, k, dtype=torch.bfloat16), torch.zeros(m, k, dtype=torch.int8), torch.zeros(m, 1)
    w, sb, out = torch.zeros(n, k, dtype=torch.int8), torch.ones(n), torch.empty(m, n, dtype=torch.bfloat16)
    sync = torch.zeros(2, dtype=torch.int32)
    low_rank = (torch.zeros(32, k, dtype=torch.bfloat16), torch.zeros(32, n, dtype=torch.bfloat16), 32) if lora else None
    cfg = ti.coop_config(m, n, k, torch.device("cpu"))
    _, args, _ = tc.launch_args(x, q, s, w, sb, None, out, sync, cfg, ti._low_rank_args(low_rank, x, sb), 0)
    fn = tc.w8a8_coop
    names = list(fn.arg_names)
    assert len(args) == len(names)
    const = {p.name for p in fn.params if p.is_constexpr}
    free = {p.name for p in fn.params if getattr(p, "do_not_specialize", False)}
    sig = {nm: ("constexpr" if nm in const else mangle_type(a)) for nm, a in zip(names, args, strict=True)}
    consts = {nm: a for nm, a in zip(names, args, strict=True) if nm in const}
    # what Triton's launcher specializes on: 16-byte aligned tensors, sizes that are multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, (nm, a) in enumerate(zip(names, args, strict=True))
             if nm not in const and nm not in free and (
                 (isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0)
                 or (isinstance(a, int) and not isinstance(a, bool) and a % 16 == 0))}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.warps, "num_stages": cfg.stages, "launch_cooperative_grid": True})


@pytest.mark.parametrize(("m", "n", "k", "lora"), [(256, 3072, 3072, False), (16, 10240, 4096, True),
                                                   (1024, 1280, 1280, False)])
def test_compiles_for_sm90_with_a_gpu_scope_barrier_and_no_spills(m: int, n: int, k: int, lora: bool) -> None:
    from tests.test_gluon_gemm import _assert_no_spills

    kern = _compile(m, n, k, lora)
    ptx = kern.asm["ptx"]
    atoms = re.findall(r"atom\.global\.gpu\.(\w+)\.(\w+)\.", ptx)
    assert sorted(atoms) == [("acq_rel", "add"), ("relaxed", "exch"), ("release", "add")], atoms
    assert len(re.findall(r"ld\.global\.gpu\.acquire\.b32", ptx)) >= 1  # the generation polls
    assert "cp.async.cg.shared.global" in ptx and "s32.s8.s8" in ptx  # int8 wgmma on tiles copied through L2
    assert kern.metadata.launch_cooperative_grid
    _assert_no_spills(ptx)
