"""A CPU speed path for half-precision (bf16 / fp16) inference, switched on explicitly: `fast_cpu.enable(model)`.

On CPUs without bf16/fp16 matrix instructions (AVX2, no AMX / AVX512-BF16), PyTorch multiplies half-precision
matrices one row of x at a time, so from a few rows on it is several times faster to upcast the weight to fp32, a
cache-sized block of rows at a time, and use the fp32 matrix kernel. Same inputs, fp32 accumulation and one
rounding of the output, as in the half-precision kernel; only the summation order differs. model.py itself uses
plain nn.Linear / F.linear; bench/bench_generate.py turns this on for its bf16 rows.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK_ROWS = 4096   # weight rows upcast at a time: (4096, in) in fp32 is ~9 MB for in = 576, cache-sized


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through fp32 blocks of the weight when that is the faster kernel.

    Training (grad enabled), autocast, other devices, fp32 weights and fewer than 4 rows (one-token decode steps,
    where the half-precision kernel is the faster one) take the plain path.
    """
    rows = x.numel() // x.shape[-1]
    if (rows < 4 or x.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16)
            or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    xf = x.float()                                                       # (..., in)
    blocks = weight.split(BLOCK_ROWS)                                    # (<= BLOCK_ROWS, in) each
    if len(blocks) == 1:
        y = F.linear(xf, weight.float())                                 # (..., out), fp32
    else:
        y = torch.cat([F.linear(xf, w.float()) for w in blocks], dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _fast_linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def enable(model: nn.Module) -> nn.Module:
    """Route every nn.Linear of `model` and its output projection (model.output_weight) through `linear`.

    Works on the instance: each nn.Linear gets its own forward, and model.forward computes the hidden states with
    the core's forward (hidden_only=True) and projects them here. Returns the model.
    """
    if getattr(model, "fast_cpu", False):
        return model
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.forward = partial(_fast_linear_forward, m)
    core_forward = model.forward

    def forward(*args, hidden_only: bool = False, **kwargs):
        hidden = core_forward(*args, hidden_only=True, **kwargs)           # (B, T, C)
        return hidden if hidden_only else linear(hidden, model.output_weight)  # (B, T, V)

    model.forward = forward
    model.fast_cpu = True
    return model
