"""What a storage format is: names, the tensors it stores, its math, and how ComfyUI and the runtime use it.

A :class:`QuantFormat` is the one place a format is described. The converter's plan (outputs and
``comfy_quant``), ``inspect``, the loader's validation, layer-config aliases, ``quantize_``, the compat CLI and
the runtime's layout all read it. Most formats are an :class:`AffineFormat`: an element grid (``grids``) times
one scale per block (``scaling``), optionally in a rotated basis and packed; a new format of that kind is a
declaration, not code. Layer parameters (``params``) are a plain JSON-able dict per layer (group sizes, flags).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from comfyquant.formats import scaling
from comfyquant.formats.grids import FloatGrid, Fp4Grid, IntGrid

Params = dict[str, Any]
# comfy_quant keys every quantized format may carry (ComfyUI reads them at the top level or under "params").
COMMON_FLAGS = ("full_precision_matrix_mult",)


class FormatShapeError(ValueError):
    """A weight shape the format cannot take (e.g. K not a multiple of the rotation group); says why."""


@dataclass(frozen=True)
class TensorSlot:
    """One stored tensor of a layer: key suffix (``weight``, ``weight_scale``, ...), dtype and shape."""

    suffix: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def conf_value(conf: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Read a ``comfy_quant`` key the way ComfyUI does: top level first, then under ``params``."""
    if key in conf:
        return conf[key]
    params = conf.get("params")
    if isinstance(params, Mapping) and key in params:
        return params[key]
    return default


class QuantFormat:
    """A format's identity and behaviour. Subclasses implement the math; instances are registered by name.

    ``name`` is the CLI name (``int8``, ``int8-rot``, ...); ``comfy_format`` the ``format`` string in
    ``comfy_quant`` (None for plain casts); ``aliases`` other names a layer config or the compat CLI may use;
    ``stock_comfy`` whether stock ComfyUI 0.30.0 loads it; ``kernel_kind`` the runtime kernel table entry that
    runs it (``runtime.kernels``); ``storage_dtype`` the dtype of the stored ``weight``.
    """

    name: str = ""
    comfy_format: str | None = None
    aliases: tuple[str, ...] = ()
    stock_comfy: bool = True
    kernel_kind: str | None = None
    storage_dtype: torch.dtype = torch.int8
    description: str = ""
    rotated: bool = False
    # Nominal storage cost, for the size budget of automatic precision (bits per weight element, scales aside).
    bits: float = 8.0
    # Automatic precision (``comfyquant.autoprec``) offers this format only for a ``--target-gpu`` of this
    # generation or newer (``registry.GPU_GENERATIONS``): formats whose kernels exist only there (nvfp4, mxfp8 on
    # Blackwell). None: offered for every target.
    min_gpu: str | None = None
    # Layer options ``resolve`` reads besides the common flags (``convrot_groupsize``, ``block_size``, ...).
    options: tuple[str, ...] = ()
    # The format a layer falls back to when its shape cannot take this one (None: keep it in high precision).
    fallback: str | None = None

    # ---- identity ----------------------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        """True for formats that store ``comfy_quant`` metadata (False for plain casts)."""
        return self.comfy_format is not None

    def __repr__(self) -> str:
        return f"<format {self.name}>"

    # ---- per-layer parameters ----------------------------------------------------------------------------
    def resolve(self, shape: tuple[int, int], options: Mapping[str, Any] | None = None) -> Params:
        """This layer's parameters from user options (group sizes, flags); FormatShapeError if it can't fit."""
        return self._common(options)

    @staticmethod
    def _common(options: Mapping[str, Any] | None) -> Params:
        opts = options or {}
        return {k: True for k in COMMON_FLAGS if opts.get(k)}

    def slots(self, shape: tuple[int, int], params: Mapping[str, Any]) -> list[TensorSlot]:
        """The tensors a layer of this shape stores, in write order (``comfy_quant`` excluded)."""
        raise NotImplementedError

    def comfy_quant(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The layer's ``comfy_quant`` JSON object."""
        conf: dict[str, Any] = {"format": self.comfy_format}
        conf.update({k: True for k in COMMON_FLAGS if params.get(k)})
        return conf

    def params_from_conf(self, conf: Mapping[str, Any]) -> Params:
        """Inverse of :meth:`comfy_quant` (for files read back); ValueError for values the format can't take."""
        return {k: True for k in COMMON_FLAGS if conf_value(conf, k, False)}

    def claims(self, conf: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether a stored layer (its ``comfy_quant`` and tensor shapes) is this format rather than a sibling
        with the same ComfyUI ``format`` string (``int8`` vs ``int8-tensor`` vs ``int8-rot``)."""
        return conf.get("format") == self.comfy_format

    # ---- math ----------------------------------------------------------------------------------------------
    def transform(self, w: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """The weight in the basis it is quantized in (identity unless the format rotates)."""
        return w

    def untransform(self, w: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return w

    def transform_hessian(self, h: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """An input Hessian ``X^T X`` in the quantization basis (``R^T H R`` for a rotation ``R``)."""
        return h

    def grid(self, w_t: torch.Tensor, params: Mapping[str, Any]) -> LayerGrid:
        """Scales chosen for the (transformed) weight ``w_t``: the grid an optimizer rounds onto."""
        raise NotImplementedError

    def quantize_input(self, x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """Activations ``x [M, K]`` as the format's reference kernel multiplies them, in the original basis
        (float32): what automatic precision charges a layer for its activation rounding. Identity here (weight-only
        kernels multiply float activations)."""
        return x

    def quantize(self, w: torch.Tensor, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Round-to-nearest: the stored tensors (by suffix) of a float weight ``[N, K]``."""
        w_t = self.transform(_work(w), params)
        return self.grid(w_t, params).encode(w_t)

    def dequantize(self, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (original basis) of stored tensors."""
        raise NotImplementedError

    def row_chunk(self, params: Mapping[str, Any]) -> int | None:
        """Rows that share scales (quantize in chunks of a multiple of it), or None when rows are coupled."""
        return None

    def take_rows(self, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                  rows: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The stored tensors of a subset of whole row groups (for sampled error statistics), or None."""
        return None

    # ---- runtime -------------------------------------------------------------------------------------------
    def kernel_args(self, tensors: Mapping[str, torch.Tensor | None],
                    params: Mapping[str, Any]) -> tuple[tuple[torch.Tensor | None, ...], tuple[int, ...]]:
        """(scales, opts) for ``runtime.kernels.quant_linear`` of this format's ``kernel_kind``."""
        return (tensors.get("weight_scale"),), ()

    def runtime_slots(self) -> tuple[str, ...]:
        """Stored tensors besides ``weight`` that the runtime keeps (optional ones may be absent)."""
        return tuple(s for s in ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale"))

    def validate(self, layer: str, conf: Mapping[str, Any], tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 shape: tuple[int, int] | None = None) -> list[str]:
        """Problems ComfyUI/the runtime would hit loading this layer ([] when it loads). ``tensors`` maps suffix
        -> (dtype, shape); ``shape`` is the model's logical ``[N, K]`` when known."""
        problems: list[str] = []
        try:
            params = self.params_from_conf(conf)
        except ValueError as e:
            return [str(e)]
        w = tensors.get("weight")
        if w is None:
            return ["comfy_quant without a weight tensor"]
        logical = shape or self.logical_shape(w[1], params)
        if logical is None:
            return [f"weight shape {list(w[1])} cannot hold a {self.name} weight"]
        if shape is not None and self.logical_shape(w[1], params) != tuple(shape):
            problems.append(f"weight shape {list(w[1])} does not match the layer {list(shape)}")
            return problems
        try:
            params = {**params, **self.resolve(logical, params)}
        except FormatShapeError as e:
            return [str(e)]
        for slot in self.slots(logical, params):
            got = tensors.get(slot.suffix)
            if got is None:
                if slot.suffix != "input_scale":
                    problems.append(f"comfy_quant without {slot.suffix}")
                continue
            dtype, shp = got
            if not _dtype_ok(slot.dtype, dtype):
                problems.append(f"{slot.suffix} is {_dt(dtype)}, format {self.comfy_format} stores {_dt(slot.dtype)}")
            if not self.shape_ok(slot, tuple(shp)):
                problems.append(f"{slot.suffix} shape {list(shp)} does not match weight {list(w[1])} "
                                f"(want {self.describe_shape(slot, params)})")
        return problems

    def logical_shape(self, stored: tuple[int, ...], params: Mapping[str, Any]) -> tuple[int, int] | None:
        """The logical ``[N, K]`` of a stored ``weight`` shape (None if it cannot be one)."""
        return (stored[0], stored[1]) if len(stored) == 2 else None

    def shape_ok(self, slot: TensorSlot, got: tuple[int, ...]) -> bool:
        """Whether a stored tensor's shape is acceptable for ``slot`` (formats accept equivalent spellings)."""
        return got == slot.shape

    def describe_shape(self, slot: TensorSlot, params: Mapping[str, Any]) -> str:
        return str(list(slot.shape)) if slot.shape else "a scalar"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_ok(want: torch.dtype, got: torch.dtype) -> bool:
    # older writers store fp8 bytes as uint8 and ComfyUI views them as fp8; E8M0 scales are stored as uint8
    # (safetensors cannot read F8_E8M0 back) and ComfyUI views them as float8_e8m0fnu
    return (got == want or (got == torch.uint8 and want in (torch.float8_e4m3fn, torch.float8_e5m2))
            or (got == torch.float8_e8m0fnu and want == torch.uint8))


def _work(w: torch.Tensor) -> torch.Tensor:
    """float32 (or float64 when given float64): the precision every quantizer computes in."""
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


@dataclass(frozen=True)
class LayerGrid:
    """One layer's rounding grid with fixed scales, in the quantization basis: what optimizers round onto.

    ``scales`` are the stored scale tensors (by suffix); ``fake_quant`` rounds any weight (or a column slice of
    it) onto the grid and returns floats; ``encode`` turns an on-grid (or any) weight into the stored tensors.
    """

    fmt: AffineFormat
    params: Mapping[str, Any]
    shape: tuple[int, int]
    scales: Mapping[str, torch.Tensor]

    def scale_for(self, cols: slice = slice(None)) -> torch.Tensor:
        """Elementwise scale broadcastable to ``w[:, cols]`` (float32)."""
        return self.fmt.element_scale(self.scales, self.params, self.shape, cols)

    def codes(self, w: torch.Tensor, cols: slice = slice(None)) -> torch.Tensor:
        """Grid codes of ``w[:, cols]`` (unpacked: int8 values / fp8 values / E2M1 codes)."""
        s = self.scale_for(cols).to(w.dtype if w.dtype == torch.float64 else torch.float32)
        return self.fmt.element_grid.round(scaling.divide(w, s))

    def fake_quant(self, w: torch.Tensor, cols: slice = slice(None)) -> torch.Tensor:
        """``values(round(w / s)) * s`` for the columns ``cols``, in w's float dtype."""
        work = w.dtype if w.dtype == torch.float64 else torch.float32
        s = self.scale_for(cols).to(work)
        return self.fmt.element_grid.values(self.fmt.element_grid.round(scaling.divide(w.to(work), s)), work) * s

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors for ``w`` (full ``[N, K]``, quantization basis) on this grid."""
        out = {"weight": self.fmt.pack(self.codes(w), self.params)}
        out.update(self.scales)
        return out


class AffineFormat(QuantFormat):
    """``w ≈ values(codes) * scale`` with one fp32 scale per block of the (optionally transformed) weight.

    Subclasses set ``element_grid`` and implement :meth:`block` (the scale granularity for a layer); rotated or
    packed formats override the transform / pack hooks.
    """

    element_grid: IntGrid | FloatGrid | Fp4Grid
    # The grid the reference kernel rounds activations onto, one absmax scale per row (token), in the
    # quantization basis (W8A8: ``INT8``); None: the kernel multiplies float activations.
    input_grid: IntGrid | FloatGrid | None = None

    # ---- scale granularity -------------------------------------------------------------------------------
    def block(self, shape: tuple[int, int], params: Mapping[str, Any]) -> scaling.Block:
        raise NotImplementedError

    def scale_slot_shape(self, shape: tuple[int, int], params: Mapping[str, Any]) -> tuple[int, ...]:
        """How the scale grid is stored: a 0-dim scalar for per-tensor, else the grid shape."""
        block = self.block(shape, params)
        return () if block == (None, None) else scaling.grid_shape(shape, block)

    def storage_shape(self, shape: tuple[int, int], params: Mapping[str, Any]) -> tuple[int, ...]:
        return tuple(shape)

    def logical_shape(self, stored: tuple[int, ...], params: Mapping[str, Any]) -> tuple[int, int] | None:
        return (stored[0], stored[1]) if len(stored) == 2 else None

    def slots(self, shape: tuple[int, int], params: Mapping[str, Any]) -> list[TensorSlot]:
        return [TensorSlot("weight", self.storage_dtype, self.storage_shape(shape, params)),
                TensorSlot("weight_scale", torch.float32, self.scale_slot_shape(shape, params))]

    def shape_ok(self, slot: TensorSlot, got: tuple[int, ...]) -> bool:
        if slot.suffix == "weight_scale":
            if not slot.shape:
                return math.prod(got) == 1 and len(got) <= 2
            if len(slot.shape) == 2 and slot.shape[1] == 1:  # per-row: [N, 1] or [N]
                return got in (slot.shape, slot.shape[:1])
        return got == slot.shape

    # ---- packing -------------------------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return codes

    def unpack(self, stored: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return stored

    # ---- math ----------------------------------------------------------------------------------------------
    def choose_scales(self, w_t: torch.Tensor, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """absmax / grid max per block (stored form)."""
        shape = (w_t.shape[0], w_t.shape[1])
        amax = scaling.block_absmax(w_t, self.block(shape, params))
        s = scaling.safe_scale(amax, self.element_grid.max)
        return {"weight_scale": s.reshape(self.scale_slot_shape(shape, params))}

    def element_scale(self, scales: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                      shape: tuple[int, int], cols: slice = slice(None)) -> torch.Tensor:
        s = scales["weight_scale"].float()
        block = self.block(shape, params)
        if s.numel() != math.prod(scaling.grid_shape(shape, block)):
            block = scaling.infer_block(tuple(s.shape), shape)  # other tools' per-row / per-tensor scales
        return scaling.expand(s, block, shape, cols)

    def grid(self, w_t: torch.Tensor, params: Mapping[str, Any]) -> LayerGrid:
        shape = (w_t.shape[0], w_t.shape[1])
        return LayerGrid(self, dict(params), shape, self.choose_scales(w_t, params))

    def quantize_input(self, x: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """Per-row (per-token) dynamic rounding onto ``input_grid`` in the quantization basis, as the reference
        kernels do (``runtime.kernels.reference``); identity when the format has no ``input_grid``."""
        grid = self.input_grid
        if grid is None:
            return x
        x_t = self.transform(x.float(), params)
        s = scaling.safe_scale(x_t.abs().amax(dim=1, keepdim=True), grid.max)
        return self.untransform(grid.values(grid.round(x_t / s), torch.float32) * s, params)

    def dequantize(self, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if tensors.get("weight_scale") is None:
            raise ValueError(f"format {self.comfy_format} needs a weight_scale")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        codes = self.unpack(tensors["weight"], params)
        if codes.dim() != 2 and tensors["weight_scale"].numel() == 1 and not self.rotated:
            # a reshaped view of a scalar-scaled weight (runtime views): elementwise, any shape
            scale = tensors["weight_scale"].to(work).reshape(())
            return (self.element_grid.values(codes, work) * scale).to(dtype)
        shape = (codes.shape[0], codes.shape[1])
        w_t = self.element_grid.values(codes, work) * self.element_scale(tensors, params, shape).to(work)
        return self.untransform(w_t, params).to(dtype)

    def row_chunk(self, params: Mapping[str, Any]) -> int | None:
        bn = self.block((1, 1), params)[0]
        return bn  # 1 for per-row scales, b for tiles; None (per-tensor) couples all rows

    def take_rows(self, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                  rows: torch.Tensor) -> dict[str, torch.Tensor] | None:
        out = dict(tensors)
        w = tensors["weight"]
        out["weight"] = w[rows]
        s = tensors.get("weight_scale")
        if s is not None and s.numel() > 1:
            n = w.shape[0]
            bn = self.block((n, 1), params)[0] or n
            groups = torch.unique(rows // bn)
            whole = (groups[:, None] * bn + torch.arange(bn, device=rows.device)[None, :]).reshape(-1)
            if not torch.equal(whole[whole < n], rows):
                return None  # rows must be whole row groups, in order
            out["weight_scale"] = s[groups]
        return out


class CastFormat(QuantFormat):
    """A plain dtype cast (fp16, bf16): no ``comfy_quant``, loads as an ordinary weight everywhere."""

    def __init__(self, name: str, dtype: torch.dtype, description: str, aliases: tuple[str, ...] = ()) -> None:
        self.name, self.storage_dtype, self.description, self.aliases = name, dtype, description, aliases
        self.bits = 8.0 * torch.empty((), dtype=dtype).element_size()

    def slots(self, shape: tuple[int, int], params: Mapping[str, Any]) -> list[TensorSlot]:
        return [TensorSlot("weight", self.storage_dtype, tuple(shape))]

    def comfy_quant(self, params: Mapping[str, Any]) -> dict[str, Any]:
        raise TypeError(f"{self.name} is a plain cast and has no comfy_quant")

    def quantize(self, w: torch.Tensor, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"weight": w.to(self.storage_dtype)}

    def dequantize(self, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return tensors["weight"].to(dtype)

    def row_chunk(self, params: Mapping[str, Any]) -> int | None:
        return 1
