"""The digits DiT: a small diffusion transformer with exactly Flux's module layout and key names.

The math follows the Flux architecture as ComfyUI 0.30 runs it (double-stream blocks, single-stream blocks,
RMS QK-norm, 3-axis RoPE with ``axes_dim`` [16, 56, 56], sinusoidal time embedding scaled by 1000, adaLN
modulation), so ComfyUI's own Flux class can load and run the weights. Fixed values ComfyUI does not read
from the file (head dim 128, mlp ratio 4, 16 latent channels, patch 2, qkv bias, theta 10000) are kept.
The class-label conditioner (``conditioner.*``) stands in for the text encoder and is not part of Flux.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AXES_DIM = (16, 56, 56)
HEAD_DIM = sum(AXES_DIM)  # 128, what ComfyUI derives num_heads from
THETA = 10000
PATCH = 2
LATENT_CHANNELS = 16
MLP_RATIO = 4


@dataclass(frozen=True)
class DiTConfig:
    """Shape of one digits DiT; everything else is Flux's fixed values."""

    hidden: int = 128
    depth: int = 2
    depth_single: int = 2
    context_dim: int = 64
    vec_dim: int = 32
    txt_tokens: int = 4
    num_classes: int = 10

    @property
    def heads(self) -> int:
        return self.hidden // HEAD_DIM

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def config_from_state_dict(sd: Mapping[str, Tensor]) -> DiTConfig:
    """Infer the config from tensor shapes, the way ComfyUI's model detection does for Flux."""
    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    txt_table = sd["conditioner.txt_table"]
    return DiTConfig(hidden=sd["img_in.weight"].shape[0], depth=count("double_blocks."),
                     depth_single=count("single_blocks."), context_dim=sd["txt_in.weight"].shape[1],
                     vec_dim=sd["vector_in.in_layer.weight"].shape[1], txt_tokens=txt_table.shape[1],
                     num_classes=txt_table.shape[0] - 1)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] (cos half first, as in Flux)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_freqs(ids: Tensor, axes_dim: tuple[int, ...] = AXES_DIM, theta: int = THETA) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[B, 1, L, HEAD_DIM/2]`` for position ids ``[B, L, n_axes]``."""
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** torch.linspace(0, (d - 2) / d, d // 2, dtype=torch.float64)
        angles.append(ids[..., i].double()[..., None] * omega.to(ids.device))
    a = torch.cat(angles, dim=-1).float()[:, None]
    return a.cos(), a.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (2j, 2j+1) of the last dim of ``x [B, H, L, D]``."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.reshape(x.shape).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """RoPE then softmax attention; ``[B, H, L, D]`` in, ``[B, L, H*D]`` out."""
    q, k = apply_rope(q, *pe), apply_rope(k, *pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


class MLPEmbedder(nn.Module):
    """Linear - SiLU - Linear (Flux's time_in / vector_in)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm with a ``scale`` parameter (Flux's checkpoint name; ComfyUI renames it to ``weight``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale.to(x.dtype))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.norm = QKNorm(HEAD_DIM)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """``lin(silu(vec))`` split into (shift, scale, gate) triples: two for double blocks, one for single."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.n = 6 if double else 3
        self.lin = nn.Linear(dim, self.n * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        return list(self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1))


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, hidden * MLP_RATIO), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden * MLP_RATIO, hidden))


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, joint attention over both."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = hidden // HEAD_DIM
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(hidden, double=True))
            setattr(self, f"{s}_attn", SelfAttention(hidden))
            setattr(self, f"{s}_mlp", _mlp(hidden))

    def _qkv(self, x: Tensor, mod: list[Tensor], attn: SelfAttention) -> tuple[Tensor, Tensor, Tensor]:
        shift, scale = mod[0], mod[1]
        q, k, v = _split_heads(attn.qkv(_layer_norm(x) * (1 + scale) + shift), self.heads)
        return attn.norm.query_norm(q).to(v), attn.norm.key_norm(k).to(v), v

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        im, tm = self.img_mod(vec), self.txt_mod(vec)
        iq, ik, iv = self._qkv(img, im, self.img_attn)
        tq, tk, tv = self._qkv(txt, tm, self.txt_attn)
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        n_txt = txt.shape[1]
        t_attn, i_attn = attn[:, :n_txt], attn[:, n_txt:]
        img = img + im[2] * self.img_attn.proj(i_attn)
        img = img + im[5] * self.img_mlp(_layer_norm(img) * (1 + im[4]) + im[3])
        txt = txt + tm[2] * self.txt_attn.proj(t_attn)
        txt = txt + tm[5] * self.txt_mlp(_layer_norm(txt) * (1 + tm[4]) + tm[3])
        return img, txt


class SingleStreamBlock(nn.Module):
    """One fused linear for qkv + MLP-in, one for attn-out + MLP-out (parallel attention/MLP)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.heads = hidden // HEAD_DIM
        self.linear1 = nn.Linear(hidden, hidden * (3 + MLP_RATIO))
        self.linear2 = nn.Linear(hidden * (1 + MLP_RATIO), hidden)
        self.norm = QKNorm(HEAD_DIM)
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(_layer_norm(x) * (1 + scale) + shift),
                               [3 * self.hidden, MLP_RATIO * self.hidden], dim=-1)
        q, k, v = _split_heads(qkv, self.heads)
        q, k = self.norm.query_norm(q).to(v), self.norm.key_norm(k).to(v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")), 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(_layer_norm(x) * (1 + scale) + shift)


class LabelConditioner(nn.Module):
    """Class label (``num_classes`` = the null label for CFG) -> txt tokens and pooled vector."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.txt_table = nn.Parameter(torch.randn(cfg.num_classes + 1, cfg.txt_tokens, cfg.context_dim))
        self.vec_table = nn.Parameter(torch.randn(cfg.num_classes + 1, cfg.vec_dim))

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        return self.txt_table[labels], self.vec_table[labels]


class DigitsDiT(nn.Module):
    """Flux-layout DiT over 16-channel latents; ``forward(x, t, context, y)`` predicts the flow velocity."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.hidden % HEAD_DIM:
            raise ValueError(f"hidden must be a multiple of {HEAD_DIM} for Flux's fixed head dim, got {cfg.hidden}")
        self.cfg = cfg
        h = cfg.hidden
        self.img_in = nn.Linear(LATENT_CHANNELS * PATCH * PATCH, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.vec_dim, h)
        self.txt_in = nn.Linear(cfg.context_dim, h)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(h) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(h) for _ in range(cfg.depth_single))
        self.final_layer = LastLayer(h, LATENT_CHANNELS * PATCH * PATCH)
        self.conditioner = LabelConditioner(cfg)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor) -> Tensor:
        """``x [B, 16, H, W]`` latents, ``t [B]`` in [0, 1], ``context [B, L, ctx]``, ``y [B, vec]``."""
        b, c, hh, ww = x.shape
        gh, gw = hh // PATCH, ww // PATCH
        img = x.reshape(b, c, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1)
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(t).to(img.dtype)) + self.vector_in(y)
        txt = self.txt_in(context)
        pe = rope_freqs(torch.cat((torch.zeros(b, txt.shape[1], 3, device=x.device),
                                   image_ids(b, gh, gw, x.device)), 1))
        for blk in self.double_blocks:
            img, txt = blk(img, txt, vec, pe)
        seq = torch.cat((txt, img), 1)
        for blk in self.single_blocks:
            seq = blk(seq, vec, pe)
        out = self.final_layer(seq[:, txt.shape[1]:], vec)
        return out.reshape(b, gh, gw, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)

    def velocity(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """Conditioned prediction for integer labels (``num_classes`` = unconditional)."""
        context, y = self.conditioner(labels)
        return self(x, t, context.to(x.dtype), y.to(x.dtype))


def image_ids(b: int, gh: int, gw: int, device: torch.device | str) -> Tensor:
    """Position ids (0, row, col) per image token, row-major, as Flux assigns them."""
    ids = torch.zeros(gh, gw, 3, device=device)
    ids[..., 1] = torch.arange(gh, device=device, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(gw, device=device, dtype=torch.float32)[None, :]
    return ids.reshape(1, gh * gw, 3).expand(b, -1, -1)


def flux_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The part of a digits-DiT state dict that is the Flux diffusion model (drops the label conditioner)."""
    return {k: v for k, v in sd.items() if not k.startswith("conditioner.")}
