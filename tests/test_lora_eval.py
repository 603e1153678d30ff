"""``comfyquant eval --lora``: the committed mirror LoRA visibly changes the digits DiT's samples, and the int8
model with the LoRA merged before quantizing tracks the float model with the LoRA (docs/QUALITY.md, LoRA)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from comfyquant.errors import UserError
from comfyquant.eval.cli import eval_main
from comfyquant.eval.harness import EvalConfig, run_eval
from comfyquant.eval.sampling import SampleConfig
from comfyquant.eval.train_lora import LORA_ASSET

pytestmark = pytest.mark.usefixtures("torch_single_thread")
SMALL = SampleConfig(steps=6, cfg=3.0, per_class=1, seed=1234)


def test_mirror_lora_asset_is_a_kohya_lora_with_its_recipe() -> None:
    with safe_open(str(LORA_ASSET), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "train_command" in meta and meta["style"] == "digits mirrored left-right"
    assert len([k for k in keys if k.endswith(".lora_up.weight")]) == 26  # every linear of the 4 blocks
    assert all(k.startswith("lora_unet_") for k in keys)


@pytest.mark.cpu_int8
def test_eval_merge_keeps_the_lora_effect(tmp_path: Path) -> None:
    rep = run_eval(EvalConfig(model="digits-dit", format="int8", out=tmp_path, sampling=SMALL, lora=LORA_ASSET,
                              lora_mode="merge"))
    effect = rep["lora"]["effect_vs_base"]["psnr_db"]["mean"]
    quant = rep["metrics"]["psnr_db"]["mean"]
    assert "26 of 26 modules matched" in rep["lora"]["match"]
    assert effect < 20.0  # the LoRA moves samples far (measured: see docs/QUALITY.md)
    assert quant > effect + 15.0  # int8 + merged LoRA stays close to float + LoRA
    assert (tmp_path / "lora_effect" / "samples.png").is_file()


def test_eval_lora_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="--lora-mode must be one of merge, bake, dynamic"):
        run_eval(EvalConfig(model="digits-dit", format="int8", out=tmp_path, lora=LORA_ASSET, lora_mode="x"))
    assert eval_main(["--model", "digits-dit", "--format", "int8", "--lora", str(tmp_path / "none.safetensors"),
                      "--out", str(tmp_path), "--per-class", "1", "--steps", "1"]) == 2
    assert "input not found" in capsys.readouterr().err
    with pytest.raises(UserError, match="peer cannot merge"):
        run_eval(EvalConfig(model="digits-dit", format="int8", out=tmp_path, lora=LORA_ASSET, peer="simple"))
