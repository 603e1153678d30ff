"""SD1.x / SDXL transformer blocks' LayerNorms folded into the quantized linears they feed.

ComfyUI's ``BasicTransformerBlock`` (``comfy.ldm.modules.attention``) runs ``norm1`` before ``attn1``'s q / k / v,
``norm2`` before ``attn2.to_q`` and ``norm3`` before the feed-forward's input projection, each an affine
LayerNorm: one launch and a write and read of the activation per norm, three per block, about 210 per SDXL
UNet call. The fold (``runtime.norms``: the norm's module becomes a ``FoldedNorm`` passing x through, its layers
apply it in their quantizer as ``acts.shared_layer_norm``) is right for the stock forward only while nothing
reads the normed activation between the norm and those layers. ComfyUI hands it to ``attn1_patch`` /
``attn2_patch`` patches, and attn2 reads x itself in to_k / to_v when it gets no context; for such a call the
block's forward (an object patch, :class:`UnfoldingForward`) runs the norms in torch and the layers apply none
(``runtime.norms.unfolded``). Attention replacement patches (IPAdapter's ``attn2`` replace) get q / k / v from the
layers and need nothing. Blocks whose k / v read another input (``disable_self_attn``, the temporal blocks'
``switch_temporal_ca_to_sa``) or that have an input feed-forward or no cross-attention are not folded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from comfyquant.runtime.norms import FoldedNorm, NormSpec, norm_spec, unfolded

ATTENTION = "comfy.ldm.modules.attention"
ESCAPES = ("attn1_patch", "attn2_patch")  # patches that read the normed activation


def _plain_block(block: nn.Module) -> bool:
    """A stock ``BasicTransformerBlock`` whose three norms each feed only the listed layers (see the module
    docstring)."""
    return (type(block).__name__ == "BasicTransformerBlock" and type(block).__module__ == ATTENTION
            and not getattr(block, "ff_in", False) and not getattr(block, "disable_self_attn", True)
            and not getattr(block, "switch_temporal_ca_to_sa", True) and getattr(block, "attn2", None) is not None)


def _ff_input(block: nn.Module) -> str | None:
    """The feed-forward's input projection below the block: ``ff.net.0.proj`` (GEGLU, or the stand-in the
    library's activation fold puts there, ``runtime.fold.ProjectionOnly``) or ``ff.net.0.0`` (Linear, GELU)."""
    first = block.ff.net[0]
    if type(first).__name__ in ("GEGLU", "ProjectionOnly"):
        return "ff.net.0.proj"
    if isinstance(first, nn.Sequential) and len(first) > 0 and hasattr(first[0], "in_features"):
        return "ff.net.0.0"  # (FeedForward without glu: Linear, GELU)
    return None


def unet_norm_folds(dm: nn.Module, fits: Callable[[str, NormSpec], bool]
                    ) -> list[tuple[str, str, tuple[str, ...], NormSpec]]:
    """``(block path, norm name, consumer layer paths, spec)`` for every norm of a plain transformer block of
    ``dm`` whose consumers all ``fits(path, spec)`` (converted layers whose quantizer folds it); nothing is
    changed."""
    out = []
    for path, block in dm.named_modules():
        if not _plain_block(block):
            continue
        ff = _ff_input(block)
        for norm_name, consumers in (("norm1", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
                                     ("norm2", ("attn2.to_q",)), ("norm3", (ff,) if ff else ())):
            norm = block._modules.get(norm_name)
            spec = None if norm is None or not consumers else norm_spec(norm)
            if spec is None or not spec.layer:
                continue
            full = tuple(f"{path}.{c}" if path else c for c in consumers)
            if all(fits(p, spec) for p in full):
                out.append((path, norm_name, full, spec))
    return out


class UnfoldingForward:
    """A transformer block's ``forward`` (a ComfyUI object patch on the clone): its class's forward, with its
    folded norms unfolded for a call that has ``attn1_patch`` / ``attn2_patch`` patches or no context."""

    def __init__(self, block: nn.Module, holders: list[FoldedNorm]) -> None:
        self.block, self.holders = block, holders

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.block).forward
        context = kwargs["context"] if "context" in kwargs else args[1] if len(args) > 1 else None
        options = kwargs.get("transformer_options", args[2] if len(args) > 2 else None) or {}
        patches = options.get("patches") or {}
        if context is None or any(patches.get(name) for name in ESCAPES):
            with unfolded(self.holders):
                return forward(self.block, *args, **kwargs)
        return forward(self.block, *args, **kwargs)


def fold_unet_blocks(dm: nn.Module, fits: Callable[[str, NormSpec], bool], install: Callable[[str, Any], None],
                     taken: Callable[[str], bool]) -> tuple[list[str], dict[str, Any]]:
    """Fold the transformer blocks' norms of ``dm``: ``install(path, obj)`` puts a ``FoldedNorm`` in each norm's
    slot and an :class:`UnfoldingForward` as each block's ``forward`` (the adapter: object patches of its clone;
    the loader, which owns its model: set in place), except where ``taken(path)`` says another patch set that
    slot already. Returns (what was folded, ``"input_blocks.1.1.transformer_blocks.0.norm1 ->
    attn1.to_q,attn1.to_k,attn1.to_v"``; each consumer layer's ``NormSource``, for its ``input_norm``)."""
    folds = [f for f in unet_norm_folds(dm, fits)
             if not taken(f"{f[0]}.forward") and not taken(f"{f[0]}.{f[1]}")]
    by_block: dict[str, list[FoldedNorm]] = {}
    done, sources = [], {}
    for path, norm_name, consumers, spec in folds:
        norm_path = f"{path}.{norm_name}" if path else norm_name
        holder = FoldedNorm(dm.get_submodule(norm_path), spec)
        install(norm_path, holder)
        sources.update({c: holder.source() for c in consumers})
        by_block.setdefault(path, []).append(holder)
        rel = [c[len(path) + 1:] if path else c for c in consumers]
        done.append(f"{norm_path} -> {','.join(rel)}")
    for path, holders in by_block.items():
        install(f"{path}.forward" if path else "forward", UnfoldingForward(dm.get_submodule(path), holders))
    return done, sources
