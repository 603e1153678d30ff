"""The whole-model benchmark's models: minimal re-implementations with the real layer shapes.

Attention through ``F.scaled_dot_product_attention``; RoPE and convolutions omitted. Each is what
``bench.models`` times in bf16 and quantized; ``build`` there sizes and initializes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comfyquant.runtime.modulation import ModulationSite, modulated_module


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


def _mod_in(layer: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
            site: ModulationSite | None) -> torch.Tensor:
    """``layer((1 + scale) * ln(x) + shift)``: in torch as written (the bf16 baseline's arithmetic), or with a
    ``site`` through ``runtime.modulation`` (the quantized layer's quantizer applies it: :func:`fold_modulation`).
    An ``nn.Sequential`` hands it to its first layer."""
    if site is None:
        return layer((1 + scale) * _ln(x) + shift)
    return modulated_module(layer, x, shift, scale, 1e-6, site)


def _gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, folded: bool) -> torch.Tensor:
    """``x + gate * y`` (two launches), or one ``addcmul`` where the block's norms are folded."""
    return torch.addcmul(x, y, gate) if folded else x + gate * y


def fold_modulation(model: nn.Module) -> int:
    """Give every Flux / Flux.2 block of ``model`` its norm sites, so its modulated LayerNorms go to the quantized
    layers they feed (``runtime.modulation``) and its residual adds are one ``addcmul``; returns the blocks."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, FLUX_BLOCKS):
            mod.sites = [ModulationSite(1e-6) for _ in range(4 if isinstance(mod, FluxDouble | Flux2Double) else 1)]
            n += 1
    return n


def _attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b = q.shape[0]
    q, k, v = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class FluxDouble(nn.Module):
    def __init__(self, d: int = 3072, heads: int = 24) -> None:
        super().__init__()
        self.heads = heads
        self.mod = nn.ModuleList(nn.Linear(d, 6 * d) for _ in range(2))
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        # as ComfyUI's DoubleStreamBlock: Sequential(Linear, GELU(tanh), Linear) (quantize_ folds the GELU)
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
                                 for _ in range(2))
        self.sites: list[ModulationSite] | None = None  # fold_modulation: (txt, img) x (attention, MLP)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs, mods, qkvs, sites = (txt, img), [], [], self.sites or [None] * 4
        for i, x in enumerate(xs):
            m = self.mod[i](F.silu(vec))[:, None, :].chunk(6, dim=-1)
            mods.append(m)
            qkvs.append(_mod_in(self.qkv[i], x, m[0], m[1], sites[2 * i]).chunk(3, dim=-1))
        q, k, v = (torch.cat([t[j] for t in qkvs], 1) for j in range(3))
        att = _attn(q, k, v, self.heads)
        n_txt, outs, folded = txt.shape[1], [], self.sites is not None
        for i, (x, a) in enumerate(((txt, att[:, :n_txt]), (img, att[:, n_txt:]))):
            m = mods[i]
            x = _gated(x, self.proj[i](a), m[2], folded)
            x = _gated(x, _mod_in(self.mlp[i], x, m[3], m[4], sites[2 * i + 1]), m[5], folded)
            outs.append(x)
        return outs[1], outs[0]


class FluxSingle(nn.Module):
    def __init__(self, d: int = 3072, heads: int = 24) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.mod = nn.Linear(d, 3 * d)
        self.linear1 = nn.Linear(d, 3 * d + 4 * d)
        self.linear2 = nn.Linear(d + 4 * d, d)
        self.sites: list[ModulationSite] | None = None  # fold_modulation

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        m = self.mod(F.silu(vec))[:, None, :].chunk(3, dim=-1)
        h = _mod_in(self.linear1, x, m[0], m[1], self.sites and self.sites[0])
        qkv, mlp = h.split([3 * self.d, 4 * self.d], dim=-1)
        a = _attn(*qkv.chunk(3, dim=-1), self.heads)
        y = self.linear2(torch.cat([a, F.gelu(mlp, approximate="tanh")], dim=-1))
        return _gated(x, y, m[2], self.sites is not None)


class Flux(nn.Module):
    """Double blocks, then single blocks on the joined text + image tokens (``vec``: what every block gets)."""

    def __init__(self, double: int = 2, single: int = 4, blocks: tuple[type, type] | None = None) -> None:
        super().__init__()
        double_cls, single_cls = blocks or (FluxDouble, FluxSingle)
        self.doubles = nn.ModuleList(double_cls() for _ in range(double))  # not "double": nn.Module.double()
        self.singles = nn.ModuleList(single_cls() for _ in range(single))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        for b in self.doubles:
            img, txt = b(img, txt, vec)
        x = torch.cat([txt, img], 1)
        for b in self.singles:
            x = b(x, vec)
        return x[:, txt.shape[1]:]


class SiLUActivation(nn.Module):
    """Flux.2's MLP activation (ComfyUI's class of this name): ``silu(first half) * second half`` (SwiGLU);
    ``quantize_`` folds it into the next linear (``acts.act_of_module``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


class Flux2Double(nn.Module):
    """Flux.2's double block: no biases, modulation computed outside the blocks, SwiGLU MLPs."""

    def __init__(self, d: int = 6144, heads: int = 48, mlp: int = 18432) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d, bias=False) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(d, 2 * mlp, bias=False), SiLUActivation(),
                                               nn.Linear(mlp, d, bias=False)) for _ in range(2))
        self.sites: list[ModulationSite] | None = None  # fold_modulation: (txt, img) x (attention, MLP)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mods[:, None, :].chunk(6, dim=-1)
        xs, sites, folded = (txt, img), self.sites or [None] * 4, self.sites is not None
        q, k, v = (torch.cat(t, 1) for t in zip(*(_mod_in(self.qkv[i], x, m[0], m[1], sites[2 * i]).chunk(3, dim=-1)
                                                    for i, x in enumerate(xs)), strict=True))
        att = _attn(q, k, v, self.heads)
        n_txt, outs = txt.shape[1], []
        for i, (x, a) in enumerate(((txt, att[:, :n_txt]), (img, att[:, n_txt:]))):
            x = _gated(x, self.proj[i](a), m[2], folded)
            outs.append(_gated(x, _mod_in(self.mlp[i], x, m[3], m[4], sites[2 * i + 1]), m[5], folded))
        return outs[1], outs[0]


class Flux2Single(nn.Module):
    """Flux.2's single block: one fused input linear (qkv + SwiGLU input), SwiGLU applied inside forward."""

    def __init__(self, d: int = 6144, heads: int = 48, mlp: int = 18432) -> None:
        super().__init__()
        self.heads, self.d, self.mlp = heads, d, mlp
        self.linear1 = nn.Linear(d, 3 * d + 2 * mlp, bias=False)
        self.linear2 = nn.Linear(d + mlp, d, bias=False)
        self.sites: list[ModulationSite] | None = None  # fold_modulation

    def forward(self, x: torch.Tensor, mods: torch.Tensor) -> torch.Tensor:
        m = mods[:, None, : 3 * self.d].chunk(3, dim=-1)  # the first three of the six modulation vectors
        h = _mod_in(self.linear1, x, m[0], m[1], self.sites and self.sites[0])
        qkv, h = h.split([3 * self.d, 2 * self.mlp], dim=-1)
        a = _attn(*qkv.chunk(3, dim=-1), self.heads)
        g, u = h.chunk(2, dim=-1)
        return _gated(x, self.linear2(torch.cat([a, F.silu(g) * u], dim=-1)), m[2], self.sites is not None)


class Flux2(Flux):
    def __init__(self, double: int = 1, single: int = 2) -> None:
        super().__init__(double, single, (Flux2Double, Flux2Single))


FLUX_BLOCKS = (FluxDouble, FluxSingle, Flux2Double, Flux2Single)


class WanBlock(nn.Module):
    def __init__(self, d: int = 5120, heads: int = 40, ffn: int = 13824) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.cq, self.ck, self.cv, self.co = (nn.Linear(d, d) for _ in range(4))
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, d))  # as ComfyUI's

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        m = e.chunk(6, dim=1)
        y = _ln(x) * (1 + m[1]) + m[0]
        x = x + self.o(_attn(_rms(self.q(y)), _rms(self.k(y)), self.v(y), self.heads)) * m[2]
        y = _ln(x)
        x = x + self.co(_attn(_rms(self.cq(y)), _rms(self.ck(ctx)), self.cv(ctx), self.heads))
        y = _ln(x) * (1 + m[4]) + m[3]
        return x + self.ffn(y) * m[5]


class Wan(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(WanBlock() for _ in range(blocks))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x, ctx, e)
        return x


class GEGLU(nn.Module):
    """SD1.x / SDXL's gated projection (ComfyUI's class of this name): ``x * gelu(gate)`` of one doubled
    projection; ``quantize_`` folds the gate into the next linear (``acts.projected_act_of_module``)."""

    def __init__(self, d: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class SelfAttention(nn.Module):
    """SDXL's ``attn1`` (ComfyUI's ``CrossAttention`` without a context): to_q / to_k / to_v read x, no bias."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(d, d), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(_attn(self.to_q(x), self.to_k(x), self.to_v(x), self.heads))


class CrossAttention(nn.Module):
    """SDXL's ``attn2``: to_q reads x, to_k / to_v the 2048-wide text context."""

    def __init__(self, d: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k, self.to_v = nn.Linear(ctx, d, bias=False), nn.Linear(ctx, d, bias=False)
        self.to_out = nn.Sequential(nn.Linear(d, d), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.to_out(_attn(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads))


class FeedForward(nn.Module):
    """ComfyUI's ``FeedForward(glu=True)``: GEGLU, dropout, linear."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(d, 4 * d), nn.Dropout(0.0), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """SDXL's transformer block with ComfyUI's layout: affine LayerNorms (``norm1`` / ``norm2`` / ``norm3``, as
    SDXL's weights have them) before self-attention, cross-attention to 2048-wide text and the GEGLU
    feed-forward. Each norm is read only by the listed linears (``runtime.norms`` folds them); ComfyUI's own
    block also hands them to attention patches, so only this one is in its table."""

    def __init__(self, d: int, heads: int, ctx: int = 2048) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d) for _ in range(3))
        self.attn1 = SelfAttention(d, heads)
        self.attn2 = CrossAttention(d, heads, ctx)
        self.ff = FeedForward(d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), ctx)
        return x + self.ff(self.norm3(x))


class Sdxl(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hi = nn.ModuleList(BasicTransformerBlock(640, 10) for _ in range(2))
        self.lo = nn.ModuleList(BasicTransformerBlock(1280, 20) for _ in range(4))

    def forward(self, x640: torch.Tensor, x1280: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        for b in self.hi:
            x640 = b(x640, ctx)
        for b in self.lo:
            x1280 = b(x1280, ctx)
        return x640.mean() + x1280.mean()


def _gelu_tanh(a: torch.Tensor) -> torch.Tensor:
    return F.gelu(a, approximate="tanh")


class T5DenseGatedActDense(nn.Module):
    """T5 v1.1's gated feed-forward as ComfyUI's class of this name: ``wo(act(wi_0(x)) * wi_1(x))``, ``act`` a
    plain attribute (wi_0 / wi_1 read the same input; the gated fold, ``runtime.gated``, applies to it)."""

    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.wi_0, self.wi_1, self.wo = (nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False),
                                         nn.Linear(ff, d, bias=False))
        self.act = _gelu_tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5LayerNorm(nn.Module):
    """ComfyUI's T5 norm (class, attribute names and forward as ``comfy.text_encoders.t5``'s): an RMSNorm in five
    elementwise ops; ``runtime.norms`` folds it into the quantized linears it feeds."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight.to(x.dtype) * x


class T5Attention(nn.Module):
    """T5's self-attention as ComfyUI's class of this name reads its input: through q / k / v only."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(_attn(self.q(x), self.k(x), self.v(x), self.heads))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(d, heads)
        self.layer_norm = T5LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x))


class T5LayerFF(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(d, ff)
        self.layer_norm = T5LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Layer(nn.Module):
    """One T5 v1.1 block with ComfyUI's module tree (``layer.0.SelfAttention.q``, ``layer.1.DenseReluDense.wi_0``,
    their ``layer_norm``s): the structure the node pack and ``quantize_`` see in ComfyUI's T5."""

    def __init__(self, d: int = 4096, heads: int = 64, ff: int = 10240) -> None:
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(d, heads), T5LayerFF(d, ff)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x))


class T5(nn.Module):
    def __init__(self, layers: int = 4, d: int = 4096, heads: int = 64, ff: int = 10240) -> None:
        super().__init__()
        self.layers = nn.ModuleList(T5Layer(d, heads, ff) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class RMSNorm(nn.Module):
    """ComfyUI's Llama-family norm (``comfy.text_encoders.llama.RMSNorm``: weight, ``eps``, one ``rms_norm``;
    ``add``: Gemma's, which scales by ``1 + weight``, its weight around 0)."""

    def __init__(self, d: int, eps: float = 1e-6, add: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d) if add else torch.ones(d))
        self.eps = eps
        self.add = add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + 1.0 if self.add else self.weight
        return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), self.eps)


class Attention(nn.Module):
    """ComfyUI's Llama attention as it reads its input (q / k / v_proj only; grouped kv heads, Qwen3's per-head
    q / k norms; RoPE omitted as in the other bench models)."""

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(d, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        q = self.q_norm(self.q_proj(hidden_states).view(b, n, self.heads, -1)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(b, n, self.kv_heads, -1)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.kv_heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).flatten(2))


def _gelu_tanh_act(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """ComfyUI's Llama MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))``, ``act`` silu (Llama / Qwen) or gelu
    with the tanh approximation (Gemma); the gated fold applies."""

    def __init__(self, d: int, ff: int, gelu: bool = False) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)
        self.activation = _gelu_tanh_act if gelu else F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """ComfyUI's Llama block (``comfy.text_encoders.llama.TransformerBlock``): norm, attention, residual; norm,
    MLP, residual."""

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, ff: int) -> None:
        super().__init__()
        self.self_attn = Attention(d, heads, kv_heads, head_dim)
        self.mlp = MLP(d, ff)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(hidden_states=self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerBlockGemma2(nn.Module):
    """ComfyUI's Gemma 2 / 3 block (``comfy.text_encoders.llama.TransformerBlockGemma2``): ``1 + weight`` norms
    before and after attention and the MLP (the pre-norms fold into the quantizers, the post-norms act on outputs
    and stay), a gelu-tanh gated MLP; sliding-window masks and RoPE omitted."""

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, ff: int) -> None:
        super().__init__()
        self.self_attn = Attention(d, heads, kv_heads, head_dim)
        self.mlp = MLP(d, ff, gelu=True)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d, add=True), RMSNorm(d, add=True)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = RMSNorm(d, add=True), RMSNorm(d, add=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(hidden_states=self.input_layernorm(x)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Qwen3(nn.Module):
    """Qwen3-4B-shaped text encoder (Z-Image's; Qwen-Image's Qwen2.5-VL-7B and Flux.2's Mistral have the same
    block): hidden 2560, 32 query / 8 kv heads of 128, MLP 9728; ``layers`` of its 36 blocks."""

    def __init__(self, layers: int = 4, d: int = 2560, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                 ff: int = 9728, block: type[nn.Module] = TransformerBlock) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block(d, heads, kv_heads, head_dim, ff) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Gemma3(Qwen3):
    """Gemma-3-12B-shaped text encoder (LTX-2's; Lumina 2's Gemma-2-2B has the same block): hidden 3840, 16 query
    / 8 kv heads of 256, MLP 15360; ``layers`` of its 48 blocks."""

    def __init__(self, layers: int = 4, d: int = 3840, heads: int = 16, kv_heads: int = 8, head_dim: int = 256,
                 ff: int = 15360) -> None:
        super().__init__(layers, d, heads, kv_heads, head_dim, ff, TransformerBlockGemma2)


def _quick_gelu(a: torch.Tensor) -> torch.Tensor:
    return a * torch.sigmoid(1.702 * a)


class CLIPAttention(nn.Module):
    """CLIP's attention as ComfyUI's class of this name reads its input: through q / k / v only (causal mask
    omitted)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(_attn(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    """ComfyUI's ``CLIPMLP``: fc1, quick_gelu (a plain function, as ComfyUI's), fc2."""

    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.activation = _quick_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPLayer(nn.Module):
    """ComfyUI's ``CLIPLayer``: affine LayerNorms before attention and the MLP (``runtime.norms`` folds them)."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = CLIPAttention(d, heads)
        self.mlp = CLIPMLP(d, ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipL(nn.Module):
    """CLIP-L's text encoder (SD1.x / SDXL / SD3 / Flux): 12 layers of 768 wide, 12 heads, MLP 3,072."""

    def __init__(self, layers: int = 12, d: int = 768, heads: int = 12, ff: int = 3072) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(d, heads, ff) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.final_layer_norm(x)
