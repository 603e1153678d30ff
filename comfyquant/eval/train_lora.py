"""Train a LoRA on the digits DiT that visibly changes its samples (digits mirrored left-right), for the LoRA
quality study (``comfyquant eval --lora``, docs/QUALITY.md).

The base model stays frozen; every linear layer of the double and single blocks gets a rank-``r`` LoRA
(``up`` starts at zero, so training starts from the base model), trained with the base model's own rectified-flow
loss on horizontally flipped digits. The file is written in kohya's key layout (``lora_unet_<layer>.lora_up /
lora_down / alpha``, bf16) with the command in its metadata. Rebuild the committed asset (CPU, a few minutes)::

    python -m comfyquant.eval.train_lora --out comfyquant/eval/assets --steps 1500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from comfyquant.eval.data import load_digits, to_latent
from comfyquant.eval.sampling import flow_loss
from comfyquant.eval.workloads import DIT_FIXTURE, DigitsWorkload

LORA_ASSET = Path(__file__).parent / "assets" / "digits_lora_mirror.safetensors"


@dataclass(frozen=True)
class LoraTrainConfig:
    """Optimisation settings; recorded in the file's metadata."""

    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    rank: int = 8
    alpha: float = 4.0
    seed: int = 0


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * up(down(x))`` with the base layer frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / math.sqrt(base.in_features))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((x @ self.down.T) @ self.up.T)


def attach(model: nn.Module, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    """Wrap every ``nn.Linear`` inside ``double_blocks`` / ``single_blocks``; returns them by layer name."""
    gen = torch.Generator().manual_seed(seed)
    wrapped: dict[str, LoRALinear] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.startswith(("double_blocks.", "single_blocks.")):
            parent, _, child = name.rpartition(".")
            lora = LoRALinear(mod, rank, alpha, gen)
            setattr(model.get_submodule(parent), child, lora)
            wrapped[name] = lora
    return wrapped


def train(cfg: LoraTrainConfig, log_every: int = 250) -> tuple[nn.Module, dict[str, LoRALinear]]:
    torch.manual_seed(cfg.seed)
    model = DigitsWorkload().float_model()
    for p in model.parameters():
        p.requires_grad_(False)
    loras = attach(model, cfg.rank, cfg.alpha, cfg.seed)
    params = [p for lora in loras.values() for p in (lora.down, lora.up)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    data = load_digits()
    x_all = to_latent(torch.flip(data.images, dims=[-1]))  # the new "style": every digit mirrored
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    for step in range(cfg.steps):
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, x_all.shape[0], (cfg.batch,), generator=gen)
        loss = flow_loss(model.velocity, x_all[idx], data.labels[idx], model.cfg.num_classes, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
    return model, loras


def save_lora(loras: dict[str, LoRALinear], cfg: LoraTrainConfig, path: Path, command: str) -> None:
    sd: dict[str, torch.Tensor] = {}
    for name, lora in loras.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = lora.down.detach().to(torch.bfloat16).contiguous()
        sd[f"{key}.lora_up.weight"] = lora.up.detach().to(torch.bfloat16).contiguous()
        sd[f"{key}.alpha"] = torch.tensor(cfg.alpha, dtype=torch.bfloat16)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank), "ss_network_alpha": str(cfg.alpha),
            "comfyquant_base": DIT_FIXTURE.name, "train_config": json.dumps(cfg.__dict__), "train_command": command,
            "style": "digits mirrored left-right"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--steps", type=int, default=LoraTrainConfig.steps)
    p.add_argument("--rank", type=int, default=LoraTrainConfig.rank)
    p.add_argument("--seed", type=int, default=LoraTrainConfig.seed)
    args = p.parse_args(argv)
    cfg = LoraTrainConfig(steps=args.steps, rank=args.rank, seed=args.seed)
    _, loras = train(cfg)
    out = args.out / LORA_ASSET.name
    command = "python -m comfyquant.eval.train_lora " + " ".join(sys.argv[1:] if argv is None else argv)
    save_lora(loras, cfg, out, command)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
