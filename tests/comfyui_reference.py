"""Float64 references, with stated error bounds, for one layer of a quantized file run by ComfyUI's own ops.

``check_layer`` loads one layer through ``comfy.ops.mixed_precision_ops(...).Linear`` (ComfyUI's
``_load_from_state_dict``), runs it on random inputs and compares with

* (a) the plain float64 product ``x @ W_deq^T + b`` of our dequantized weights (``dequantize_weight``), within a
  bound derived from how ComfyUI treats activations, and
* (b) for float32 compute, a float64 emulation of that activation treatment, within floating-point slack plus,
  for int8, one step ``s_i |W~_jk|`` for each activation within 2e-3 steps of a rounding tie (float32 and float64
  may round those to different sides). A weight scale off by 1% fails (b).

Bounds (elementwise, for output ``[i, j]``; ``x~`` is ``x`` or, for convrot, ``x`` rotated by ``H`` per group;
``W~`` the stored weight in that basis, dequantized; ``u`` the compute dtype's unit roundoff):

* int8_tensorwise (comfy-kitchen ``int8_linear``): each row of ``x~`` is quantized with ``s_i = max|x~_i|/127``
  and round-to-nearest, so every activation moves by at most ``s_i/2`` and nothing is clipped; the int8 product
  is exact in int32. Hence ``|y - y_ref| <= k * s_i * sum_k |W~_jk| + slack`` with ``k = 1/2`` for float32.
  In bfloat16 the quotient ``x/s`` and ``s`` itself are rounded to bfloat16 (<= 1/4 + 1/2 units more), so
  ``k = 3/2``. Slack covers float accumulation, the rotation done in the compute dtype and output rounding.
* float8 (ComfyUI casts activations to the weight's fp8 dtype with scale 1, then ``_scaled_mm``): each activation
  moves by at most ``u8 |x| + sub/2`` (``u8 = 2^-4`` e4m3, ``2^-3`` e5m2; ``sub`` the smallest subnormal).
* plain fp16/bf16 weights: no activation change; only slack.
* ``full_precision_matrix_mult`` on fp8: activations are not cast to fp8, the weight is dequantized; only slack.
  On int8_tensorwise ComfyUI 0.30 ignores it on the CPU path (``cast_bias_weight`` only dequantizes when the
  dtype changes, so the int8 weight reaches comfy-kitchen's ``int8_linear``): the int8 bounds apply unchanged.
* int8_blockwise (comfyquant's own runtime; stock ComfyUI refuses it): the int8 bound above without rotation.
* convrot_w4a4 (comfy-kitchen ``convrot_w4a4_linear``): the int8 reasoning with int4: each row of ``x~`` is
  quantized with ``s_i = max|x~_i|/7``, round-to-nearest, nothing clipped, the int4 product exact. ``k = 1/2`` for
  float32; in bfloat16 the rotation, ``s`` and the quotient ``x~/s`` (<= 7) are computed in bfloat16, which adds at
  most ``7 * 2^-8`` units to the rounding (``s`` is the same bfloat16 value when quantizing and rescaling), so
  ``k = 9/16``; the rotation's own rounding and the bfloat16 epilogue are in the slack.
* nvfp4 / mxfp8: ComfyUI's ``pick_operations`` disables them on devices without SM >= 10 (the CPU included: its
  quantized-activation path needs block-scaled ``_scaled_mm``, which the CPU refuses), so the layer dequantizes the
  weight in the compute dtype and activations are unchanged: only slack. ``load_comfy_linear`` passes that same
  disabled set. mxfp8 dequantizes exactly (power-of-two scales, fp8 values fit bfloat16); nvfp4 rounds
  ``global * block`` once in float32, three times in bfloat16 (<= 2^-7 relative, inside the bfloat16 slack).

Slack: ``(K + 16) * 2^-24`` times ``|x~| @ |W~|^T + |b|`` for float32 (a worst-case summation bound), and
``2^-6`` times the same for bfloat16 (weights, activations, output and bias each rounded to bfloat16).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from comfyquant.formats import REGISTRY, dequantize_weight
from comfyquant.formats import conf_value as layer_param
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.quant.hadamard import hadamard_matrix
from comfyquant.quant.int4 import unpack_int4

F32_U = 2.0**-24
FP8_ACT = {  # fp8 dtype -> (relative half-ulp, half the smallest subnormal)
    torch.float8_e4m3fn: (2.0**-4, 2.0**-10),
    torch.float8_e5m2: (2.0**-3, 2.0**-17),
}
FORMAT_DTYPE = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
PACKED_K = ("convrot_w4a4", "nvfp4")  # two elements per stored byte along K
BLOCK_SCALED = ("nvfp4", "mxfp8")


def stock_int8_params(formats: Iterable[str]) -> list[Any]:
    """``formats`` as pytest parameters, the ones stock ComfyUI runs as ``int8_tensorwise`` (its CPU int8 GEMM)
    marked ``stock_comfy_int8_cpu``, so that a pass on a CPU without VNNI can leave those cases out."""
    int8 = pytest.mark.stock_comfy_int8_cpu
    return [pytest.param(f, marks=int8) if REGISTRY.get(f).comfy_format == "int8_tensorwise" else f for f in formats]


def layer_tensors(sd: Mapping[str, torch.Tensor], layer: str) -> dict[str, torch.Tensor]:
    """The tensors of one layer (``weight``, ``bias``, ``weight_scale``, ``comfy_quant``, ...) by suffix."""
    prefix = layer + "."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and "." not in k[len(prefix):]}


def linear_layers(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Layers whose ``weight`` is a 2-D matrix (what ComfyUI builds ``Linear`` modules for)."""
    return sorted(k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2)


def comfy_disabled_formats() -> list[str]:
    """The block-scaled formats ComfyUI's ``pick_operations`` runs dequantized on the CPU (no SM >= 10 there)."""
    mm = importlib.import_module("comfy.model_management")  # already imported by comfy.ops
    cpu = torch.device("cpu")
    return [f for f, native in (("nvfp4", mm.supports_nvfp4_compute(cpu)), ("mxfp8", mm.supports_mxfp8_compute(cpu)))
            if not native]


def load_comfy_linear(comfy: Any, tensors: Mapping[str, torch.Tensor], compute_dtype: torch.dtype) -> torch.nn.Module:
    """Build ComfyUI's mixed-precision ``Linear`` for the layer and load it via ``load_state_dict`` (strict).

    The op set disables the formats ``pick_operations`` disables on this device (:func:`comfy_disabled_formats`).
    """
    out_f, in_f = tensors["weight"].shape
    conf = decode_comfy_quant(tensors["comfy_quant"]) if "comfy_quant" in tensors else {}
    if conf.get("format") in PACKED_K:
        in_f *= 2
    ops = comfy.ops.mixed_precision_ops({"mixed_ops": True}, compute_dtype, disabled=comfy_disabled_formats())
    lin = ops.Linear(in_f, out_f, bias="bias" in tensors)
    res = lin.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=True)
    assert not res.missing_keys and not res.unexpected_keys, res
    return lin


@dataclass
class Expectation:
    """Reference output and elementwise tolerance (float64), with a label naming the check."""

    label: str
    ref: torch.Tensor
    tol: torch.Tensor

    def check(self, y: torch.Tensor, where: str) -> float:
        """Assert ``|y - ref| <= tol`` everywhere; return the largest ratio error / tol (for reporting)."""
        err = (y.detach().to(torch.float64) - self.ref).abs()
        ratio = float((err / self.tol).max())
        if not ratio <= 1.0:
            i = int((err - self.tol).argmax())
            raise AssertionError(f"{where} [{self.label}]: |y-ref| {float(err.flatten()[i]):.3e} > "
                                 f"tol {float(self.tol.flatten()[i]):.3e} (worst ratio {ratio:.2f})")
        return ratio


def _slack(dtype: torch.dtype, k: int) -> float:
    return (k + 16) * F32_U if dtype == torch.float32 else 2.0**-6


@functools.lru_cache(maxsize=8)
def _hadamard64(group: int) -> torch.Tensor:
    return hadamard_matrix(group, torch.float64)


def _rotate64(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x~`` and an elementwise bound ``|x| @ |H|`` on it (float64), grouped along the last dim."""
    if group is None:
        return x, x.abs()
    h = _hadamard64(group)
    lead, k = x.shape[:-1], x.shape[-1]
    xg = x.reshape(*lead, k // group, group)
    return (xg @ h).reshape(*lead, k), (xg.abs() @ h.abs()).reshape(*lead, k)


def expectations(tensors: Mapping[str, torch.Tensor], x: torch.Tensor,
                 compute_dtype: torch.dtype) -> list[Expectation]:
    """The checks (a) and, where exact emulation is possible, (b) for one layer and input ``x`` [M, K]."""
    conf = decode_comfy_quant(tensors["comfy_quant"]) if "comfy_quant" in tensors else None
    x64 = x.to(torch.float64)
    b64 = tensors["bias"].to(compute_dtype).to(torch.float64) if "bias" in tensors else torch.zeros(())
    k = x.shape[-1]
    slack = _slack(compute_dtype, k)
    if conf is None:  # plain weight: ComfyUI casts it to the compute dtype
        w = tensors["weight"].to(compute_dtype).to(torch.float64)
        ref = x64 @ w.T + b64
        return [Expectation("plain", ref, slack * (x64.abs() @ w.abs().T + b64.abs()) + 1e-30)]
    fmt = conf["format"]
    w_deq = dequantize_weight(dict(tensors), conf, torch.float64)
    ref_a = x64 @ w_deq.T + b64
    if fmt in FORMAT_DTYPE and layer_param(conf, "full_precision_matrix_mult", False):
        # fp8 weight, activations left in the compute dtype: comfy-kitchen's fp8 linear dequantizes the weight
        return [Expectation("full precision mm", ref_a, slack * (x64.abs() @ w_deq.abs().T + b64.abs()) + 1e-30)]
    if fmt == "int8_tensorwise":
        group = int(layer_param(conf, "convrot_groupsize", 256)) if layer_param(conf, "convrot", False) else None
        xr, xr_bound = _rotate64(x64, group)
        w_st = tensors["weight"].to(torch.float64) * tensors["weight_scale"].to(torch.float64)
        s = xr.abs().amax(-1, keepdim=True) / 127.0
        k_act = 0.5 if compute_dtype == torch.float32 else 1.5
        base = xr_bound @ w_st.abs().T + b64.abs()
        tol_a = k_act * s * w_st.abs().sum(-1) + slack * base
        out = [Expectation("int8 act bound", ref_a, tol_a)]
        if compute_dtype == torch.float32:
            r = xr / s
            q = r.round().clamp(-127, 127)
            near_tie = ((r.abs() - r.abs().floor()) - 0.5).abs() < 2e-3
            ref_b = (q * s) @ w_st.T + b64
            tol_b = s * (near_tie.to(torch.float64) @ w_st.abs().T) + slack * base
            out.append(Expectation("int8 emulated", ref_b, tol_b))
        return out
    if fmt == "int8_blockwise":  # our runtime: per-row dynamic activation quantization (or weight-only)
        s = x64.abs().amax(-1, keepdim=True) / 127.0
        k_act = 0.5 if compute_dtype == torch.float32 else 1.5
        tol = k_act * s * w_deq.abs().sum(-1) + slack * (x64.abs() @ w_deq.abs().T + b64.abs())
        return [Expectation("int8 act bound", ref_a, tol)]
    if fmt == "convrot_w4a4":
        return _w4a4_expectations(tensors, conf, x64, b64, ref_a, compute_dtype, slack)
    if fmt in BLOCK_SCALED:  # dequantized by ComfyUI where not native: activations untouched
        return [Expectation("dequantized weight", ref_a, slack * (x64.abs() @ w_deq.abs().T + b64.abs()) + 1e-30)]
    if fmt in FORMAT_DTYPE:
        f8 = FORMAT_DTYPE[fmt]
        rel, sub = FP8_ACT[f8]
        fmax = torch.finfo(f8).max
        assert float(x.abs().max()) < fmax, "inputs must stay inside the fp8 range (no saturation)"
        x8 = x.to(f8).to(torch.float64)
        base = x64.abs() @ w_deq.abs().T + b64.abs()
        tol_a = (rel * x64.abs() + sub) @ w_deq.abs().T + 2 * slack * base
        ref_b = x8 @ w_deq.T + b64
        return [Expectation("fp8 act bound", ref_a, tol_a),
                Expectation("fp8 emulated", ref_b, slack * (x8.abs() @ w_deq.abs().T + b64.abs()))]
    raise AssertionError(f"no reference for format {fmt!r}")


def _w4a4_expectations(tensors: Mapping[str, torch.Tensor], conf: Mapping[str, Any], x64: torch.Tensor,
                       b64: torch.Tensor, ref_a: torch.Tensor, compute_dtype: torch.dtype,
                       slack: float) -> list[Expectation]:
    """convrot_w4a4: per-row int4 activations of the rotated input (see the module docstring)."""
    group = int(layer_param(conf, "convrot_groupsize", 256))
    xr, xr_bound = _rotate64(x64, group)
    w_st = unpack_int4(tensors["weight"]).to(torch.float64) * tensors["weight_scale"].to(torch.float64).reshape(-1, 1)
    s = xr.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 7.0
    k_act = 0.5 if compute_dtype == torch.float32 else 9 / 16
    base = xr_bound @ w_st.abs().T + b64.abs()
    out = [Expectation("int4 act bound", ref_a, k_act * s * w_st.abs().sum(-1) + slack * base)]
    if compute_dtype == torch.float32:
        r = xr / s
        q = r.round().clamp(-7, 7)
        near_tie = ((r.abs() - r.abs().floor()) - 0.5).abs() < 2e-3
        ref_b = (q * s) @ w_st.T + b64
        out.append(Expectation("int4 emulated", ref_b, s * (near_tie.to(torch.float64) @ w_st.abs().T) + slack * base))
    return out


def run_layer(comfy: Any, tensors: Mapping[str, torch.Tensor], compute_dtype: torch.dtype, rows: int = 8,
              seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Load the layer into ComfyUI, run it on ``[2, rows/2, K]`` random inputs; returns (module, x2d, y2d)."""
    lin = load_comfy_linear(comfy, tensors, compute_dtype)
    k = lin.in_features
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, rows // 2, k, generator=g) * 1.5).to(compute_dtype)
    with torch.inference_mode():
        y = lin(x)
    assert y.dtype == compute_dtype and y.shape == (2, rows // 2, lin.out_features)
    return lin, x.reshape(rows, k), y.reshape(rows, -1)


def check_layer(comfy: Any, tensors: Mapping[str, torch.Tensor], compute_dtype: torch.dtype,
                where: str) -> dict[str, float]:
    """Load + run + compare one layer; returns the worst error/tolerance ratio of each check."""
    lin, x, y = run_layer(comfy, tensors, compute_dtype)
    quantized = "comfy_quant" in tensors
    qt_cls = comfy.quant_ops.QuantizedTensor
    assert isinstance(lin.weight, qt_cls) == quantized, f"{where}: weight type {type(lin.weight).__name__}"
    if quantized:
        conf = json.loads(tensors["comfy_quant"].numpy().tobytes())
        assert lin.quant_format == conf["format"], where
    else:
        assert lin.weight.dtype == compute_dtype and torch.equal(lin.weight, tensors["weight"].to(compute_dtype))
    return {e.label: e.check(y, where) for e in expectations(tensors, x, compute_dtype)}


def int8_original_expectation(tensors: Mapping[str, torch.Tensor], x: torch.Tensor, w: torch.Tensor,
                              compute_dtype: torch.dtype) -> Expectation:
    """ComfyUI's output for an int8 layer against ``x @ W^T + b`` with the ORIGINAL float weight ``W``.

    ``y - x W^T = (Q(x~) - x~) W~q^T + x~ (W~q - W H)^T``: the activation bound of :func:`expectations` plus
    the weight's own rounding, at most ``s_w,j / 2`` per element of the (rotated) weight, times ``sum_k |x~_ik|``.
    A file rotated by another convention than ComfyUI's breaks this bound (by ~7x for Sylvester, g=256).
    """
    conf = decode_comfy_quant(tensors["comfy_quant"])
    assert conf["format"] == "int8_tensorwise"
    group = int(layer_param(conf, "convrot_groupsize", 256)) if layer_param(conf, "convrot", False) else None
    x64 = x.to(torch.float64)
    b64 = tensors["bias"].to(compute_dtype).to(torch.float64) if "bias" in tensors else torch.zeros(())
    xr, xr_bound = _rotate64(x64, group)
    s_w = tensors["weight_scale"].to(torch.float64).reshape(-1, 1).expand(w.shape[0], 1)
    w_st = tensors["weight"].to(torch.float64) * s_w
    s = xr.abs().amax(-1, keepdim=True) / 127.0
    k_act = 0.5 if compute_dtype == torch.float32 else 1.5
    slack = _slack(compute_dtype, x.shape[-1])
    tol = (k_act * s * w_st.abs().sum(-1) + xr.abs().sum(-1, keepdim=True) * (0.501 * s_w.T)
           + slack * (xr_bound @ (w_st.abs() + s_w).T + b64.abs()))
    return Expectation("int8 vs original W", x64 @ w.to(torch.float64).T + b64, tol)
