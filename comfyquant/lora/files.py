"""Reading LoRA files: which adapter each module holds (LoRA / LoCon, LoHa, LoKr, DoRA, full diffs), from the
key names alone, with the tensors fetched on demand from a memory map.

Key layouts recognised (the suffix after the module name; facts from ComfyUI 0.30's ``comfy/lora.py`` and
``comfy/weight_adapter/``, kohya-ss, PEFT/diffusers and LyCORIS files):

* LoRA / LoCon: ``lora_up/lora_down(/lora_mid).weight`` (kohya), ``lora_B/lora_A.weight`` (PEFT/diffusers),
  ``lora_B/lora_A`` (Mochi), ``lora.up/down.weight``, ``_lora.up/down.weight`` (diffusers attention processors),
  ``lora_linear_layer.up/down.weight``, ``lora_B/lora_A.default.weight``; optional ``alpha`` and ``dora_scale``.
* LoHa: ``hada_w1_a/w1_b/w2_a/w2_b`` (+ ``hada_t1/t2``); LoKr: ``lokr_w1(_a/_b)/w2(_a/_b)`` (+ ``lokr_t2``).
* Full differences: ``diff`` / ``w_norm`` (weight), ``diff_b`` / ``b_norm`` (bias), ``set_weight`` (replace).

A LoRA file quantized by ``comfyquant convert --model lora`` (int8/fp8 up/down with ``weight_scale`` and
``comfy_quant``) reads back dequantized. Anything else is an error naming the file and the key: a merge must
never skip part of a LoRA silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyquant.errors import UserError
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.io.reader import CheckpointReader, TensorInfo

# (suffix, adapter kind, role); the first suffix a key ends with wins, so longer forms come first.
ROLE_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_up.weight", "lora", "up"), (".lora_down.weight", "lora", "down"), (".lora_mid.weight", "lora", "mid"),
    ("_lora.up.weight", "lora", "up"), ("_lora.down.weight", "lora", "down"),
    (".lora_B.default.weight", "lora", "up"), (".lora_A.default.weight", "lora", "down"),
    (".lora_linear_layer.up.weight", "lora", "up"), (".lora_linear_layer.down.weight", "lora", "down"),
    (".lora_B.weight", "lora", "up"), (".lora_A.weight", "lora", "down"),
    (".lora.up.weight", "lora", "up"), (".lora.down.weight", "lora", "down"),
    (".lora_B", "lora", "up"), (".lora_A", "lora", "down"),
    (".hada_w1_a", "loha", "w1a"), (".hada_w1_b", "loha", "w1b"), (".hada_w2_a", "loha", "w2a"),
    (".hada_w2_b", "loha", "w2b"), (".hada_t1", "loha", "t1"), (".hada_t2", "loha", "t2"),
    (".lokr_w1_a", "lokr", "w1a"), (".lokr_w1_b", "lokr", "w1b"), (".lokr_w2_a", "lokr", "w2a"),
    (".lokr_w2_b", "lokr", "w2b"), (".lokr_w1", "lokr", "w1"), (".lokr_w2", "lokr", "w2"),
    (".lokr_t2", "lokr", "t2"),
    (".diff_b", "bias", "diff_b"), (".b_norm", "bias", "diff_b"),
    (".diff", "diff", "diff"), (".w_norm", "diff", "diff"), (".set_weight", "set", "set"),
)
_META = (".alpha", ".dora_scale")
_QUANT_AUX = (".weight_scale", ".comfy_quant", ".input_scale", ".weight_scale_2")
_REQUIRED = {"lora": ("up", "down"), "loha": ("w1a", "w1b", "w2a", "w2b"), "diff": ("diff",), "set": ("set",)}
# Adapter keys of types ComfyUI knows but comfyquant does not merge (OFT, BOFT, GLoRA, PEFT's DoRA vector).
_UNSUPPORTED = {".oft_blocks": "OFT", ".oft_diag": "OFT", ".rescale": "OFT", ".a1.weight": "GLoRA",
                ".a2.weight": "GLoRA", ".b1.weight": "GLoRA", ".b2.weight": "GLoRA",
                ".lora_magnitude_vector": "PEFT DoRA (lora_magnitude_vector)"}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(module, kind, role)`` of an adapter tensor key, or None when the key is not one."""
    for suffix, kind, role in ROLE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], kind, role
    return None


@dataclass
class Adapter:
    """One module of a LoRA file: its adapter kind, tensor keys by role, ``alpha`` and DoRA magnitude key.

    ``kind`` is ``lora``, ``loha``, ``lokr``, ``diff``, ``set`` or ``bias`` (only a bias difference); ``bias_key``
    holds a ``diff_b`` that may come with any kind.
    """

    module: str
    kind: str
    keys: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    alpha: float | None = None
    dora_key: str | None = None
    bias_key: str | None = None

    @property
    def rank(self) -> int | None:
        """The LoRA rank (rows of ``down``), None for other kinds."""
        return self.shapes["down"][0] if self.kind == "lora" else None

    @property
    def first_key(self) -> str:
        return next(iter(self.keys.values()), self.bias_key or self.module)


class LoRAFile:
    """A parsed LoRA file: ``adapters`` by module name (in file order), read lazily through a memory map.

    ``orphans`` lists ``alpha``/``dora_scale`` keys whose module has no adapter tensors (ComfyUI ignores them too).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = CheckpointReader(self.path)
        self.metadata = dict(self.reader.metadata)
        self.quant: dict[str, dict] = {}
        self.adapters: dict[str, Adapter] = {}
        self.orphans: list[str] = []
        self._parse(self.reader.infos)

    def __repr__(self) -> str:
        kinds = sorted({a.kind for a in self.adapters.values()})
        return f"LoRAFile({self.path.name}, {len(self.adapters)} modules, {'/'.join(kinds)})"

    @property
    def name(self) -> str:
        return self.path.name

    def _err(self, key: str, why: str) -> UserError:
        return UserError(f"{self.path}: {why} (key '{key}')")

    def _parse(self, infos: Mapping[str, TensorInfo]) -> None:
        if not infos:
            raise UserError(f"{self.path}: the file holds no tensors, so it is not a LoRA")
        if "img_in.lora_A.weight" in infos and "single_blocks.0.norm.key_norm.scale" in infos:
            raise self._err("img_in.lora_A.weight", "a BFL Flux control LoRA (it widens img_in and replaces norm "
                            "scales): not a weight difference comfyquant can merge or run")
        aux = {k for k in infos if k.endswith(_QUANT_AUX) and _stem(k) + ".weight" in infos}
        meta: dict[str, dict[str, str]] = {}
        for key, info in infos.items():
            if key in aux:
                continue
            name = key.replace("lora_unet__", "lora_unet_", 1) if key.startswith("lora_unet__") else key  # Wan Fun
            for suffix in _META:
                if name.endswith(suffix):
                    meta.setdefault(name[: -len(suffix)], {})[suffix] = key
                    break
            else:
                self._add(name, key, info)
        for key in aux:
            base = _stem(key) + ".weight"
            if key.endswith(".comfy_quant"):
                self.quant.setdefault(base, {})["conf"] = decode_comfy_quant(self.reader.get(key))
            else:
                self.quant.setdefault(base, {})[key[len(_stem(key)) + 1:]] = key
        for module, found in meta.items():
            ad = self.adapters.get(module)
            if ad is None:
                self.orphans.extend(found.values())
                continue
            if ".alpha" in found:
                ad.alpha = self._scalar(found[".alpha"])
            if ".dora_scale" in found:
                ad.dora_key = found[".dora_scale"]
        for ad in self.adapters.values():
            self._check(ad)

    def _add(self, name: str, key: str, info: TensorInfo) -> None:
        parts = split_key(name)
        if parts is None:
            for suffix, what in _UNSUPPORTED.items():
                if name.endswith(suffix):
                    raise self._err(key, f"{what} adapters are not supported (comfyquant merges LoRA, LoCon, LoHa, "
                                    "LoKr, DoRA and full diffs)")
            raise self._err(key, "unknown LoRA key format: not a kohya, PEFT/diffusers, LyCORIS or ComfyUI "
                            "adapter tensor")
        module, kind, role = parts
        if info.dtype not in _FLOATS and key not in self._quantized_keys(key):
            raise self._err(key, f"adapter tensor stored as {str(info.dtype).removeprefix('torch.')} without a "
                            "comfy_quant scale")
        ad = self.adapters.setdefault(module, Adapter(module, kind))
        if role == "diff_b":
            ad.bias_key = key
            return
        if ad.kind == "bias":
            ad.kind = kind
        elif ad.kind != kind:
            raise self._err(key, f"module '{module}' mixes {ad.kind} and {kind} tensors")
        if role in ad.keys:
            raise self._err(key, f"module '{module}' has two '{role}' tensors ({ad.keys[role]})")
        ad.keys[role] = key
        ad.shapes[role] = tuple(info.shape)

    def _quantized_keys(self, key: str) -> set[str]:
        """``{key}`` if the key is a quantized weight with a comfy_quant config next to it, else empty."""
        return {key} if key.endswith(".weight") and key[: -len(".weight")] + ".comfy_quant" in self.reader.infos \
            else set()

    def _scalar(self, key: str) -> float:
        t = self.reader.get(key)
        if t.numel() != 1 or (not t.dtype.is_floating_point and t.dtype not in (torch.int32, torch.int64)):
            raise self._err(key, f"alpha must be one number, got {str(t.dtype).removeprefix('torch.')} "
                            f"{list(t.shape)}")
        value = float(t.reshape(()).item())
        if value != value or abs(value) == float("inf"):
            raise self._err(key, "alpha is NaN or Inf")
        return value

    def _check(self, ad: Adapter) -> None:
        """Every role an adapter kind needs is present and the factor shapes fit together."""
        need = _REQUIRED.get(ad.kind, ())
        missing = [r for r in need if r not in ad.keys]
        if ad.kind == "lokr":
            missing = [w for w in ("w1", "w2") if w not in ad.keys and not {f"{w}a", f"{w}b"} <= set(ad.keys)]
        if missing:
            raise self._err(ad.first_key, f"{ad.kind} module '{ad.module}' lacks its {', '.join(missing)} tensor(s)")
        s = ad.shapes
        if ad.kind == "lora" and s["up"][1] != s["down"][0]:
            raise self._err(ad.keys["up"], f"LoRA up {list(s['up'])} and down {list(s['down'])} ranks differ")
        if ad.kind == "loha" and "t1" not in s and (s["w1a"][1] != s["w1b"][0] or s["w2a"][1] != s["w2b"][0]):
            raise self._err(ad.keys["w1a"], "LoHa factor shapes do not chain (w1_a @ w1_b, w2_a @ w2_b)")

    def tensor(self, key: str) -> torch.Tensor:
        """A tensor of the file as float32 (quantized up/down matrices dequantized with their scale)."""
        t = self.reader.get(key)
        q = self.quant.get(key)
        if q is not None and "conf" in q:
            from comfyquant.formats import dequantize_weight

            parts = {"weight": t, **{k: self.reader.get(v) for k, v in q.items() if k != "conf"}}
            try:
                return dequantize_weight(parts, q["conf"], torch.float32)
            except ValueError as e:
                raise self._err(key, f"cannot dequantize: {e}") from None
        out = t.to(torch.float32)
        if not bool(torch.isfinite(out).all()):
            raise self._err(key, "holds NaN or Inf values")
        return out

    def is_quantized(self) -> bool:
        """True for a file whose adapter matrices are stored quantized (``--model lora`` output)."""
        return any("conf" in q for q in self.quant.values())


def _stem(key: str) -> str:
    return key.rsplit(".", 1)[0]


def read_lora(path: str | Path) -> LoRAFile:
    """Parse a LoRA ``.safetensors`` file (pickled ``.pt``/``.ckpt`` files are refused, never unpickled)."""
    return LoRAFile(path)
