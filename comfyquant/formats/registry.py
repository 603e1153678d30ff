"""The one table of formats: register by CLI name, look up by any name, identify stored layers.

Registration is append-only (like torch's op registration): registering never changes a format already
there, and a name or alias can belong to one format only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from comfyquant.errors import UserError
from comfyquant.formats.base import QuantFormat

# The ``format`` strings stock ComfyUI 0.30.0 accepts (``QUANT_ALGOS`` of comfy/quant_ops.py), a fact about
# ComfyUI, kept even for strings no registered format writes (``inspect`` judges other tools' files by it).
STOCK_COMFY_0_30 = frozenset({"int8_tensorwise", "float8_e4m3fn", "float8_e5m2", "mxfp8", "nvfp4", "convrot_w4a4"})

# NVIDIA GPU generations, oldest first: the values of ``QuantFormat.min_gpu`` and of ``--target-gpu``.
GPU_GENERATIONS = ("turing", "ampere", "ada", "hopper", "blackwell")


def gpu_generation(capability: tuple[int, int]) -> str | None:
    """The ``GPU_GENERATIONS`` name of an NVIDIA compute capability (None for pre-Turing GPUs)."""
    major, minor = capability
    if major >= 10:
        return "blackwell"
    if major == 9:
        return "hopper"
    if major == 8:
        return "ada" if minor >= 9 else "ampere"
    if (major, minor) >= (7, 5):
        return "turing"
    return None


def gpu_at_least(target: str | None, required: str | None) -> bool:
    """Whether a ``target`` GPU generation (None: unspecified, any GPU) is ``required`` or newer (None: any)."""
    if required is None:
        return True
    if target is None:
        return False
    return GPU_GENERATIONS.index(target) >= GPU_GENERATIONS.index(required)


class FormatRegistry:
    """Formats by CLI name, with aliases; stored layers identified by ``comfy_quant`` and tensor shapes."""

    def __init__(self) -> None:
        self._formats: dict[str, QuantFormat] = {}
        self._alias: dict[str, str] = {}

    def register(self, fmt: QuantFormat) -> QuantFormat:
        """Add ``fmt``; a name or alias already taken by another format is an error."""
        for key in (fmt.name, *fmt.aliases):
            owner = self._alias.get(key)
            if owner is not None and self._formats[owner] is not fmt:
                raise ValueError(f"format name '{key}' is already taken by {self._formats[owner]!r}")
        self._formats[fmt.name] = fmt
        self._alias.update({k: fmt.name for k in (fmt.name, *fmt.aliases)})
        return fmt

    def __iter__(self) -> Iterator[str]:
        return iter(self._formats)

    def __contains__(self, name: object) -> bool:
        return name in self._alias

    def __len__(self) -> int:
        return len(self._formats)

    def names(self) -> list[str]:
        """CLI names in registration order."""
        return list(self._formats)

    def formats(self) -> list[QuantFormat]:
        return list(self._formats.values())

    def lookup(self, name: str) -> QuantFormat | None:
        """The format called ``name`` (CLI name or alias, case-insensitive for aliases), or None."""
        key = self._alias.get(name) or self._alias.get(name.lower())
        return None if key is None else self._formats[key]

    def get(self, name: str | QuantFormat) -> QuantFormat:
        """Look a format up by any of its names; unknown names are a user error listing the choices."""
        if isinstance(name, QuantFormat):
            return name
        fmt = self.lookup(name)
        if fmt is None:
            raise UserError(f"unknown format '{name}'; choose one of: {', '.join(self._formats)}")
        return fmt

    def for_comfy_format(self, comfy_format: str) -> list[QuantFormat]:
        """The formats writing this ComfyUI ``format`` string, in registration order."""
        return [f for f in self._formats.values() if f.comfy_format == comfy_format]

    def comfy_formats(self) -> set[str]:
        """Every ComfyUI ``format`` string some registered format reads and writes."""
        return {f.comfy_format for f in self._formats.values() if f.comfy_format}

    def identify(self, conf: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> QuantFormat:
        """The format of a stored layer from its ``comfy_quant`` object and tensor shapes (suffix -> shape).

        ValueError when no registered format reads that ``format`` string.
        """
        comfy_format = conf.get("format")
        candidates = self.for_comfy_format(str(comfy_format)) if isinstance(comfy_format, str) else []
        if not candidates:
            known = ", ".join(sorted(self.comfy_formats()))
            raise ValueError(f"unsupported quantization format {comfy_format!r}; comfyquant reads {known}")
        for fmt in candidates:
            if fmt.claims(conf, shapes):
                return fmt
        return candidates[0]


REGISTRY = FormatRegistry()


def register_format(fmt: QuantFormat) -> QuantFormat:
    """Make ``fmt`` available everywhere: converter, inspect, layer configs, loader, ``quantize_``, runtime."""
    return REGISTRY.register(fmt)


def get_format(name: str | QuantFormat) -> QuantFormat:
    """A registered format by CLI name or alias (UserError listing the choices for unknown names)."""
    return REGISTRY.get(name)
