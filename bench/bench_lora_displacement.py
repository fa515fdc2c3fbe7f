"""How far does one LoRA DPO schedule move a weight matrix? The authors' set-up against this project's former one.

    python bench/bench_lora_displacement.py            # GPT-2 c_attn (2304 x 768) and Llama-3.1-8B q (4096 x 4096)
    python bench/bench_lora_displacement.py --seeds 3  # each number the median over 3 draws of A and of the data

The toy problem: one frozen linear layer W (out, in) with a LoRA adapter, trained by Adam to move its outputs on 16
fixed random inputs towards those of another random matrix (mean squared error). The schedule is the GPU presets'
DPO: 153 optimizer steps (3 epochs of Valid#1's pairs at 128 per step), 100 of them linear warm-up, then constant
lr 1e-6. Printed: ||scale * B A||_F after the run, for
  authors' set-up: A ~ N(0, 1/r^2), B at 16 x lr (LoRA+), r 16, alpha 32, gradient clip 10 (github kylokano/PAL:
                   train_lora.py's LoraConfig, trainers.py's create_loraplus_optimizer and max_grad_norm);
  ours before:     A as nn.Linear's weights (Kaiming uniform), one learning rate, r 16, alpha 32, clip 1.0
                   (the presets before issue 21);
and their ratio. The authors' set-up is also run with PEFT itself (LoraConfig(init_lora_weights="gaussian"),
peft.optimizers.create_loraplus_optimizer, their LambdaLR warm-up min(1, (step + 1) / 101)), starting from the same
A, as a check of this code's LoRA+ and init.

Why the ratio is about 16 * sqrt(3 * in) / r: Adam moves each entry of B by about lr_B a step whatever the gradient's
size (the gradient keeps its sign over these few, tiny steps), A hardly moves (1e-6 x 153 against entries of ~1e-2),
so scale * B A grows with lr_B times the size of A's entries: 1/r (Gaussian) against 1/sqrt(3 in) (Kaiming uniform,
bound 1/sqrt(in)). GPT-2 c_attn (in 768): 16 * 48 / 16 = 48; Llama q (in 4096): 16 * 110.9 / 16 = 111.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dpo  # noqa: E402
import model as modeling  # noqa: E402

SHAPES = {"GPT-2 c_attn": (2304, 768), "Llama-3.1-8B q": (4096, 4096)}
SCHEDULE = dict(steps=153, warmup=100, lr=1e-6)
AUTHORS = dict(init="gaussian", ratio=16.0, clip=10.0)
OURS_BEFORE = dict(init="kaiming", ratio=1.0, clip=1.0)


def toy_problem(out_f: int, in_f: int, seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A frozen layer (weights of std 0.02, as GPT-2's init), 16 inputs and the outputs it should move towards."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        base.weight.copy_(0.02 * torch.randn(out_f, in_f, generator=g))
    x = torch.randn(16, in_f, generator=g)
    y = x @ (0.02 * torch.randn(out_f, in_f, generator=g)).t()
    return base, x, y


def ours(out_f: int, in_f: int, init: str, ratio: float, clip: float, seed: int, r: int = 16, alpha: float = 32,
         steps: int = 153, warmup: int = 100, lr: float = 1e-6) -> tuple[float, torch.Tensor]:
    """||scale B A||_F after the schedule, with this project's LoRALinear, dpo.param_groups, AdamW (weight decay 0:
    Adam) and dpo.py's warm-up ((step + 1) / warmup, then 1); and the A the run started from."""
    base, x, y = toy_problem(out_f, in_f, seed)
    layer = modeling.LoRALinear(base, r, alpha, generator=torch.Generator().manual_seed(seed + 1), init=init)
    a0 = layer.lora_A.detach().clone()
    opt = torch.optim.AdamW(dpo.param_groups(layer, lr, ratio), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else 1.0)
    for _ in range(steps):
        loss = (layer(x) - y).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([layer.lora_A, layer.lora_B], clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return layer.delta_weight().norm().item(), a0


def peft_authors(out_f: int, in_f: int, a0: torch.Tensor, seed: int, steps: int = 153, warmup: int = 100,
                 lr: float = 1e-6) -> float:
    """The authors' set-up with PEFT and their trainer's optimizer, schedule and clip, from the same A (a0)."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    class One(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.proj = lin

        def forward(self, x):
            return self.proj(x)

    base, x, y = toy_problem(out_f, in_f, seed)
    m = get_peft_model(One(base), LoraConfig(r=16, lora_alpha=32, init_lora_weights="gaussian",
                                             target_modules=["proj"]))
    with torch.no_grad():
        m.base_model.model.proj.lora_A["default"].weight.copy_(a0)
    opt = create_loraplus_optimizer(model=m, optimizer_cls=torch.optim.Adam, lr=lr, loraplus_lr_ratio=16)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    for _ in range(steps):
        (m(x) - y).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 10.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    layer = m.base_model.model.proj
    return (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).norm().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT check")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    print("| shape | ||dW|| authors' set-up | ||dW|| ours before | ratio | expected 16 sqrt(3 in) / r "
          "| authors' set-up in PEFT |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (out_f, in_f) in SHAPES.items():
        runs = []
        for seed in range(args.seeds):
            a, a0 = ours(out_f, in_f, **AUTHORS, seed=seed, **SCHEDULE)
            b, _ = ours(out_f, in_f, **OURS_BEFORE, seed=seed, **SCHEDULE)
            p = float("nan") if args.no_peft else peft_authors(out_f, in_f, a0, seed, **SCHEDULE)
            runs.append((a, b, a / b, p))
        a, b, ratio, p = (statistics.median(col) for col in zip(*runs))
        print(f"| {name} ({out_f} x {in_f}) | {a:.3e} | {b:.3e} | {ratio:.1f} | {16 * (3 * in_f) ** 0.5 / 16:.1f} "
              f"| {p:.3e} |")


if __name__ == "__main__":
    main()
