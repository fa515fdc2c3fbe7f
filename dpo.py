"""SFT and DPO for PAL: 1. pure losses over summed log-probs; 2. log-probs of a model without its (B, T, V)
logits; 3. DPO reference log-probs; 4. the training loop, train(), from one CPU to torchrun.

A batch is right-padded; labels are IGNORE (-100) on prompt and padding; the label at position t is the token
the model should predict *from* position t-1 (Hugging Face convention), so every loss shifts by one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import IGNORE
from model import (SOFT_PROMPT_DIR, atomic_path, load_plain, lora_disabled, save_lora, save_model, save_soft_prompt,
                   write_json)


# ----------------------------------------------------------------------------------------------------------
# 1. Losses: pure functions of tensors.

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's target tokens.

    logits: (B, T, V) any float dtype (log-softmax is taken in fp32); labels: (B, T) long, IGNORE off-target.
    returns (logps (B,) fp32, ntokens (B,) long): sum over t of log p(labels[t] | tokens < t), and the count.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"sequence_logps: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    labels = labels[:, 1:]  # (B, T-1)
    mask = labels != IGNORE
    safe = labels.masked_fill(~mask, 0)  # any valid index; masked out below
    logp = torch.log_softmax(logits.float(), dim=-1)  # fp32: bf16 log-softmax loses ~2 digits
    tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (tok * mask).sum(-1), mask.sum(-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Negative log-likelihood of the target tokens, a scalar. reduction="sum": each sequence's NLL summed over
    its tokens (as PAL states), averaged over the batch; "mean": total NLL / number of target tokens."""
    logps, ntok = sequence_logps(logits, labels)
    if reduction == "sum":
        return -logps.mean()
    if reduction == "mean":
        return -logps.sum() / ntok.sum().clamp(min=1)
    raise ValueError(f"sft_loss: reduction must be 'sum' or 'mean', got {reduction!r}")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization, sigmoid form (Rafailov et al. 2023, eq. 7).

    All inputs: (B,) summed sequence log-probs. Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)):
      losses  = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
      rewards = beta * (pi - ref), detached: they are for logging, the gradient flows through `losses` only.
    """
    chosen_logratio = policy_chosen - ref_chosen  # (B,)
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))  # logsigmoid: no overflow for big margins
    return losses, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


# ----------------------------------------------------------------------------------------------------------
# 2. Log-probs from a model, without the (B, T, V) logits.
#
# On a 50k vocabulary the logits dominate a step's memory and time: B*T*V floats, a fp32 copy, the log-softmax
# and its gradient (4 x 400 MB for 8 x 256 tokens of SmolLM2). Only labelled positions matter, so we keep the
# final hidden states of the N labelled rows and compute log p(y) = h.w_y - logsumexp(h W^T) chunk by chunk.
# Its gradient w.r.t. h,  d logp_n / d h_n = w_{y_n} - softmax(h_n W^T) W,  needs no incoming gradient, so the
# forward computes it while the chunk's softmax is at hand and backward only scales it. W's gradient (trained in
# full fine-tuning; tied to the embedding in GPT-2 / SmolLM2), sum_n g_n (onehot(y_n) - softmax_n)^T h_n, needs
# g_n inside the sum: backward recomputes each chunk's logits (one extra matmul instead of O(N V) memory).

class _ChunkedTargetLogp(torch.autograd.Function):
    """logp[n] = log_softmax(h[n] @ W^T)[y[n]] for N rows, `chunk` rows at a time; fp32 softmax statistics."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, need_h):  # h (N, C), weight (V, C), targets (N,)
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 statistics (fp64 stays fp64, for gradcheck)
        out, lse = torch.empty(len(h), dtype=acc, device=h.device), torch.empty(len(h), dtype=acc, device=h.device)
        dlogp_dh = torch.empty(h.shape, dtype=acc, device=h.device) if need_h else None  # (N, C)
        for s in range(0, len(h), chunk):
            rows = slice(s, s + chunk)
            logits = (h[rows] @ weight.t()).to(acc)  # (chunk, V)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - lse[rows]
            if need_h:
                p = logits.sub_(lse[rows, None]).exp_()  # softmax, in place of the logits
                dlogp_dh[rows] = weight[targets[rows]].to(acc) - (p.to(h.dtype) @ weight).to(acc)
        ctx.save_for_backward(h, weight, targets, lse, dlogp_dh)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        h, weight, targets, lse, dlogp_dh = ctx.saved_tensors
        g = grad_out.to(lse.dtype)
        grad_h = (g[:, None] * dlogp_dh).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
            for s in range(0, len(h), ctx.chunk):
                rows = slice(s, s + ctx.chunk)
                # d logp / d logits = onehot(y) - softmax (from recomputed (chunk, V) logits), times each row's g
                d = (h[rows] @ weight.t()).to(lse.dtype).sub_(lse[rows, None]).exp_().mul_(-g[rows, None])
                d.scatter_add_(1, targets[rows, None], g[rows, None])
                grad_w += d.t().to(h.dtype) @ h[rows]
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def target_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps(hidden @ weight.T, labels) without those logits: hidden (B, T, C) final normed states,
    weight (V, C) output projection, labels (B, T) -> (logps (B,) fp32, ntokens (B,))."""
    targets = labels[:, 1:]  # (B, T-1) shifted: position t predicts label t+1
    mask = targets != IGNORE
    rows = mask.nonzero(as_tuple=True)  # labelled (b, t) pairs, N of them
    h = hidden[:, :-1][rows]  # (N, C)
    if torch.is_autocast_enabled(h.device.type):  # a custom Function is not autocast: cast like F.linear would
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
    need_h = torch.is_grad_enabled() and h.requires_grad  # else skip the gradient work in forward
    tok = _ChunkedTargetLogp.apply(h, weight, targets[rows], chunk, need_h)  # (N,) fp32
    logps = torch.zeros(labels.shape[0], dtype=tok.dtype, device=labels.device).index_add(0, rows[0], tok)
    return logps, mask.sum(-1)


def model_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (B,), ntokens (B,)) of a causal LM on a right-padded batch (no attention mask needed: causal).
    Our GPT2 / Llama (model.family) project their final hidden states at labelled positions only; any other
    module is called as model(input_ids) -> logits (B, T, V)."""
    if getattr(model, "family", None) is None:
        return sequence_logps(model(input_ids), labels)
    return target_logps(model(input_ids, hidden_only=True), model.output_weight, labels)


class LogpModel(nn.Module):
    """Wraps a causal LM so that forward() returns (logps, ntokens): DDP must see the call that builds the graph."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels):
        return model_logps(self.lm, input_ids, labels)


def concatenated_forward(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected together -> (chosen_logps (B,), rejected_logps (B,)). The halves,
    (B, Tc) and (B, Tr), are right-padded to T = max(Tc, Tr) (pad id 0 is never a target) and stacked to (2B, T):
    one pass, one graph. `model` is a causal LM or a LogpModel (possibly DDP-wrapped)."""
    t = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key: str, value: int) -> torch.Tensor:  # (2B, T)
        return torch.cat([F.pad(batch[f"{half}_{key}"], (0, t - batch[f"{half}_{key}"].shape[1]), value=value)
                          for half in ("chosen", "rejected")])

    ids, labels = both("input_ids", 0), both("labels", IGNORE)
    is_logp_model = isinstance(getattr(model, "module", model), LogpModel)
    logps, _ = model(ids, labels) if is_logp_model else model_logps(model, ids, labels)
    b = batch["chosen_input_ids"].shape[0]
    return logps[:b], logps[b:]


# ----------------------------------------------------------------------------------------------------------
# 3. Reference log-probs for DPO.

def has_lora(model: nn.Module) -> bool:
    """True when the trainable parameters are LoRA adapters (names from model.add_lora contain 'lora_')."""
    return any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@torch.no_grad()
def reference_logps(ref: nn.Module | None, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (chosen, rejected) log-probs: from `ref` (a frozen copy) or, when None, from the policy with
    its LoRA adapters switched off (the base model *is* the reference: no second copy in memory)."""
    if ref is not None:
        return concatenated_forward(ref, batch)
    with lora_disabled(policy):
        return concatenated_forward(policy, batch)


def _fingerprint(model: nn.Module, features: list[dict], precision: str) -> str:
    """Identity of a reference cache: the pairs' token ids, the reference weights (names, shapes and two float64
    moments per tensor; adapters are off for the reference, so their values do not count), the precision."""
    h = hashlib.sha256()
    for f in features:
        for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            h.update(np.asarray(f[k], dtype=np.int64).tobytes() + b"|")
    for name, t in model.state_dict().items():
        if "lora_" not in name:
            t64 = t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{t64.sum().item():.12e}{t64.abs().sum().item():.12e}".encode())
    return h.hexdigest() + precision


def cached_reference_logps(policy: nn.Module, ref: nn.Module | None, features: list[dict], collate: Callable,
                           cache_path: str | os.PathLike, batch_size: int = 8, autocast=contextlib.nullcontext,
                           device="cpu", rank: int = 0, world: int = 1, precision: str = "fp32") -> torch.Tensor:
    """Reference log-probs of every DPO pair, (N, 2) fp32 (chosen, rejected), computed once and stored at
    cache_path with a key of (features, reference weights, precision: the name of what `autocast` does); a stale
    cache is recomputed. Under DDP each rank computes every world-th pair and the parts are summed."""
    key = _fingerprint(ref if ref is not None else policy, features, precision)
    path = Path(cache_path)
    if path.exists():
        saved = load_plain(path)
        if saved.get("key") == key and saved["logps"].shape == (len(features), 2):
            return saved["logps"]
        if rank == 0:
            print(f"dpo.py: reference cache {path} is stale (other data or weights); recomputing", file=sys.stderr)
    out = torch.zeros(len(features), 2, dtype=torch.float32)
    mine = list(range(rank, len(features), world))
    was_training = policy.training
    policy.eval()
    for s in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", disable=rank != 0):
        idx = mine[s:s + batch_size]
        batch = _to_device(collate([features[i] for i in idx]), device)
        with autocast():
            c, r = reference_logps(ref, policy, batch)
        out[idx, 0], out[idx, 1] = c.float().cpu(), r.float().cpu()
    policy.train(was_training)
    if world > 1:  # each pair was computed by exactly one rank; the others hold zeros
        t = out.to(device)
        dist.all_reduce(t)
        out = t.cpu()
    if rank == 0:
        with atomic_path(path) as tmp:
            torch.save({"key": key, "logps": out}, tmp)
    return out


# ----------------------------------------------------------------------------------------------------------
# 4. The training loop: its configuration, its named steps, then train() itself.

@dataclass
class TrainConfig:
    mode: str = "sft"  # "sft" | "dpo"
    out_dir: str = "runs/train"
    batch_size: int = 8  # per process and micro-step; global batch = batch_size * grad_accum * world_size
    grad_accum: int = 1
    group_by_length: bool = False  # batches of similar lengths (less padding); off: runs keep their data order
    epochs: float = 1.0  # used when max_steps is None
    max_steps: int | None = None  # length of the run (and of the lr schedule)
    stop_at: int | None = None  # leave the loop after this step, as if killed (the schedule still spans the run)
    seed: int = 0
    lr: float = 2e-5
    optimizer: str = "adamw"  # "adamw" | "rmsprop"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "constant"  # after warmup: "constant" | "linear" (decay to 0 at the last step)
    grad_clip: float | None = 1.0
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, CPU or GPU) | "fp16" (autocast + loss scaling, GPU)
    sft_reduction: str = "sum"  # "sum": NLL summed per sequence (PAL) | "mean": per target token
    beta: float = 0.1  # DPO temperature
    reference: str = "cache"  # DPO reference: "cache" (precomputed once) | "live" (computed each step)
    dropout: bool | None = None  # None: on for SFT, off for DPO (policy and reference must agree)
    eval_every: int = 0  # optimizer steps between eval_fn calls (0: never)
    patience: int = 0  # stop after this many evals without a better score (0: never stop early)
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end and on a new best)
    save_minutes: float = 0.0  # also a checkpoint when this many minutes passed since the last one (0: off)
    lora_export: str = "merged"  # final LoRA weights: "merged" (HF layout) | "adapter" (adapter.safetensors)
    export_best: bool = True  # export the best evaluated weights; False: the last ones (evaluations only logged)
    log_every: int = 1
    resume: bool = False
    device: str = "auto"  # "auto": cuda:LOCAL_RANK when available, else cpu
    dist_timeout_min: float | None = None  # torchrun: minutes a rank may wait for the others (None: see set_up)
    progress: bool = True  # a tqdm bar on rank 0

    def __post_init__(self):
        checks = {"mode": ("sft", "dpo"), "optimizer": ("adamw", "rmsprop"), "schedule": ("constant", "linear"),
                  "precision": ("fp32", "bf16", "fp16"), "sft_reduction": ("sum", "mean"),
                  "reference": ("cache", "live"), "lora_export": ("merged", "adapter")}
        for k, allowed in checks.items():
            if getattr(self, k) not in allowed:
                raise ValueError(f"TrainConfig.{k} must be one of {allowed}, got {getattr(self, k)!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("TrainConfig.batch_size and grad_accum must be >= 1")
        for k in ("save_every", "save_minutes"):
            if not getattr(self, k) >= 0:  # written so that NaN fails too
                raise ValueError(f"TrainConfig.{k} must be >= 0 (0: off), got {getattr(self, k)!r}")
        if self.dist_timeout_min is not None and not self.dist_timeout_min > 0:
            raise ValueError(f"TrainConfig.dist_timeout_min must be > 0 (or None), got {self.dist_timeout_min!r}")


def global_batch_indices(n: int, global_batch: int, seed: int, step: int, lengths: torch.Tensor | None = None,
                         group: int = 32) -> list[int]:
    """Indices of the examples of optimizer step `step` (0-based). Each epoch is a permutation drawn from
    (seed, epoch) alone, cut into full global batches (the remainder is dropped: every rank gets as many
    examples). The data position is thus a function of the step: resuming needs nothing but the step number.

    With `lengths` (n,) the batches are grouped by length, still from (seed, epoch) alone: the permutation is cut
    into runs of `group` global batches, each run sorted by length and cut into batches, and the epoch's batches
    are shuffled. A batch pads to its longest row: random GPT-2 batches of 16 pad ~3.8k real tokens to ~5.9k;
    runs of 32 such batches leave ~1% padding, while which examples share a batch stays random within a run."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"dpo.py: {n} training examples are fewer than one global batch ({global_batch})")
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)[:per_epoch * global_batch]  # (per_epoch * global_batch,)
    if lengths is not None:
        k = int(torch.randperm(per_epoch, generator=g)[k])  # the epoch's batches in random order
        first = k // group * group  # batch k's run of `group` batches (fewer at the end), sorted by length
        run = perm[first * global_batch:(first + group) * global_batch]
        perm, k = run[torch.argsort(lengths[run], stable=True)], k - first
    return perm[k * global_batch:(k + 1) * global_batch].tolist()


def row_lengths(features: list[dict], dpo: bool) -> torch.Tensor:
    """(N,) long: the width each example takes in a batch: its sequence, or a DPO pair's longer half
    (concatenated_forward pads both halves to one width)."""
    keys = ("chosen_input_ids", "rejected_input_ids") if dpo else ("input_ids",)
    return torch.tensor([max(len(f[k]) for k in keys) for f in features], dtype=torch.long)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}  # tied weights appear once


def _barrier(world: int):
    if world > 1:
        dist.barrier()


@dataclass
class Run:
    """What set_up builds once: where this process runs and the objects one optimizer step uses."""
    rank: int
    world: int
    device: torch.device
    out_dir: Path
    dpo: bool
    autocast: Callable  # () -> context manager of the chosen precision
    scaler: torch.amp.GradScaler  # loss scaling, fp16 only (a no-op otherwise)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    net: nn.Module  # LogpModel(model), DDP-wrapped under torchrun
    global_batch: int  # sequences (pairs) per optimizer step, over all ranks
    steps_per_epoch: int
    total_steps: int


def set_up(model: nn.Module, cfg: TrainConfig, n_examples: int, ref_model: nn.Module | None) -> Run:
    """Device and process group (torchrun: nccl on GPU, gloo on CPU), precision, optimizer, lr schedule, DDP."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():  # a caller's group is kept
        # The other ranks wait in a collective while rank 0 alone evaluates (generating on Valid) or exports, and
        # NCCL's watchdog kills a run whose collective waits 10 minutes: allow 2 hours unless told otherwise.
        minutes = cfg.dist_timeout_min or float(os.environ.get("PAL_DIST_TIMEOUT_MIN", "120"))  # None: $VAR or 120
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=minutes))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    cuda = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    device = torch.device(cuda if cfg.device == "auto" else cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dpo = cfg.mode == "dpo"
    if dpo and ref_model is None and not has_lora(model):
        raise ValueError("dpo.py: DPO with full fine-tuning needs ref_model (a frozen copy of the start weights)")
    fp16_params = [n for n, p in _trainable(model).items() if p.dtype == torch.float16]
    if cfg.precision == "fp16" and fp16_params:  # GradScaler raises "Attempting to unscale FP16 gradients"
        raise ValueError(f"dpo.py: precision='fp16' (loss scaling) needs fp32 trainable weights, but "
                         f"{len(fp16_params)} are fp16 (e.g. {fp16_params[0]}): keep the weights in fp32 (dtype fp32; "
                         "autocast still computes in fp16), or train LoRA adapters kept in fp32 on the fp16 base")
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ValueError("dpo.py: precision='fp16' needs a GPU; use 'bf16' on CPU")
    if (cfg.precision == "bf16" and device.type == "cpu" and rank == 0  # without them oneDNN converts bf16 GEMMs
            and not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())):
        print("dpo.py: warning: this CPU has no bf16 matrix instructions (no AVX512-BF16 / AMX): bf16 autocast "
              "matmuls run ~10x slower than fp32 here. precision='fp32' is the fast choice.", file=sys.stderr)
    model.to(device).train(cfg.dropout if cfg.dropout is not None else not dpo)  # train(False) = dropout off
    if ref_model is not None:
        ref_model.to(device).eval().requires_grad_(False)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    params = list(_trainable(model).values())
    if not params:
        raise ValueError("dpo.py: the model has no trainable parameters")
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.RMSprop(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = n_examples // global_batch
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * max(steps_per_epoch, 1)))

    def lr_factor(step: int) -> float:  # multiplier of cfg.lr for optimizer step `step` (0-based)
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))
        return 1.0

    net = LogpModel(model)  # forward(input_ids, labels) -> (logps, ntokens): the unit DDP syncs
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(rank=rank, world=world, device=device, out_dir=out_dir, dpo=dpo, autocast=autocast,
               scaler=torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16"), opt=opt,
               sched=torch.optim.lr_scheduler.LambdaLR(opt, lr_factor), net=net, global_batch=global_batch,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps)


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint's trainer.pt."""
    step: int = 0  # optimizer steps done
    best_score: float | None = None
    bad_evals: int = 0  # evaluations since the best one
    best_dir: str | None = None  # checkpoint of the best score, relative to out_dir

    def record(self, score: float, patience: int) -> tuple[bool, bool]:
        """(new best?, stop early?) after an evaluation at this step; higher scores are better."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.bad_evals, self.best_dir = score, 0, _ckpt_name(self.step)
            return True, False
        self.bad_evals += 1
        return False, patience > 0 and self.bad_evals >= patience


@dataclass
class RunningSums:
    """Sums since the last log line. The loss is normalized by `units`: sequences, pairs, or target tokens.
    Values the device computes stay there (detached float64, 0-d; 0.0 until the first micro-step): reading one makes
    the CPU wait until the GPU has run all it was given, so only log_record reads them."""
    loss: torch.Tensor | float = 0.0
    units: float = 0.0
    correct: torch.Tensor | float = 0.0  # DPO: pairs whose chosen reward beats the rejected one
    margin: torch.Tensor | float = 0.0  # DPO: chosen reward - rejected reward
    chosen: torch.Tensor | float = 0.0
    rejected: torch.Tensor | float = 0.0
    real_tokens: int = 0  # this rank's input tokens, from the features' lengths
    padded_tokens: int = 0  # the same with the padding the model ran over
    since: float = dataclasses.field(default_factory=time.perf_counter)


def optimizer_step(run: Run, cfg: TrainConfig, model: nn.Module, features: list[dict], collate: Callable,
                   idx: list[int], ref_model: nn.Module | None, ref_cache: torch.Tensor | None,
                   sums: RunningSums) -> tuple[float, torch.Tensor | None]:
    """This rank's micro-batches of the global batch `idx`, gradients accumulated, then one update.
    -> (lr, grad norm: a 0-d tensor, read when logged). Nothing is read off the device here."""
    # the loss of one step is normalized over the whole global batch, so that 1 process x 8 sequences and
    # 2 processes x 4 sequences take the same step: per sequence (pair), or per target token
    per_token = not run.dpo and cfg.sft_reduction == "mean"
    norm = sum(sum(y != IGNORE for y in features[i]["labels"][1:]) if per_token else 1 for i in idx)
    keys = ("chosen_input_ids", "rejected_input_ids") if run.dpo else ("input_ids",)
    for micro in range(cfg.grad_accum):
        lo = (micro * run.world + run.rank) * cfg.batch_size
        rows = idx[lo:lo + cfg.batch_size]
        batch = _to_device(collate([features[i] for i in rows]), run.device)
        last = micro == cfg.grad_accum - 1  # DDP all-reduces gradients once, in the last micro-step's backward
        with contextlib.nullcontext() if run.world == 1 or last else run.net.no_sync():
            with run.autocast():
                if run.dpo:
                    pc, pr = concatenated_forward(run.net, batch)
                    # non_blocking: a blocking copy to the GPU would first wait for everything queued there
                    rc, rr = (ref_cache[rows].to(run.device, non_blocking=True).unbind(1) if ref_cache is not None
                              else reference_logps(ref_model, model, batch))
                    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, cfg.beta)
                    loss_sum = losses.sum()
                    sums.correct += (chosen_r > rejected_r).sum().double()
                    sums.margin += (chosen_r - rejected_r).sum().double()
                    sums.chosen += chosen_r.sum().double()
                    sums.rejected += rejected_r.sum().double()
                else:
                    logps, _ = run.net(batch["input_ids"], batch["labels"])
                    loss_sum = -logps.sum()
            # DDP averages gradients over ranks, hence * world: the step's loss is sum / norm overall
            run.scaler.scale(loss_sum * run.world / norm).backward()
        sums.loss += loss_sum.detach().double()
        sums.real_tokens += sum(len(features[i][k]) for i in rows for k in keys)
        sums.padded_tokens += len(rows) * len(keys) * max(batch[k].shape[1] for k in keys)  # DPO halves: one width
    sums.units += norm
    grad_norm = None
    if cfg.grad_clip:
        run.scaler.unscale_(run.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.opt.param_groups[0]["params"], cfg.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    lr = run.sched.get_last_lr()[0]
    run.sched.step()
    return lr, grad_norm


def log_record(run: Run, step: int, lr: float, grad_norm: torch.Tensor | None, sums: RunningSums) -> dict:
    """One log line: the running sums of every rank, averaged over the units they were normalized by; the share of
    real (not padding) tokens in what the model ran. The one place the loop reads values off the device."""
    names = ("loss", "correct", "margin", "chosen", "rejected", "real_tokens", "padded_tokens")
    t = torch.stack([torch.as_tensor(getattr(sums, k), dtype=torch.float64, device=run.device) for k in names])
    if run.world > 1:  # units is the same on every rank: only the other sums are added up
        dist.all_reduce(t)
    s = dict(zip(names, t.tolist()))
    grad_norm = None if grad_norm is None else grad_norm.item()  # the same on every rank (after DDP's all-reduce)
    seconds = max(time.perf_counter() - sums.since, 1e-9)  # after the reads: the GPU has done the work it was given
    n = max(sums.units, 1)
    rec = {"step": step, "epoch": step / max(run.steps_per_epoch, 1), "lr": lr, "loss": s["loss"] / n,
           "grad_norm": grad_norm, "tokens_per_s": s["padded_tokens"] / seconds,
           "real_token_share": s["real_tokens"] / max(s["padded_tokens"], 1)}
    if run.dpo:
        rec.update(reward_accuracy=s["correct"] / n, reward_margin=s["margin"] / n,
                   chosen_reward=s["chosen"] / n, rejected_reward=s["rejected"] / n)
    return rec


def write_log(run: Run, rec: dict):
    """Append one JSON line to out_dir/log.jsonl (rank 0 writes the log)."""
    if run.rank == 0:
        with open(run.out_dir / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def trim_log(path: Path, step: int):
    """Rewrite log.jsonl atomically with the records of steps <= `step` only: a resumed run writes the later ones
    again. A line cut short by a kill has no newline yet: it goes too."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # complete lines only
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= step),
                           encoding="utf-8")


def evaluate(run: Run, model: nn.Module, eval_fn: Callable, step: int) -> float:
    """eval_fn(model) with dropout off on every rank, so that it may split its work across them (pal.py's
    validation generates a share of the examples on each); rank 0's result is logged and its score broadcast."""
    was_training = model.training
    with torch.no_grad():
        r = eval_fn(model.eval())
    model.train(was_training)
    score = torch.tensor([float(r["score"] if isinstance(r, dict) else r)], dtype=torch.float64, device=run.device)
    if run.rank == 0:
        write_log(run, {"step": step, "eval": r if isinstance(r, dict) else {"score": score.item()}})
    if run.world > 1:
        dist.broadcast(score, 0)
    return score.item()


# --- checkpoints: all a run needs to go on exactly ----------------------------------------------------------
# out_dir/ckpt/step-000120/  trainable.safetensors (our names: LoRA adapters, or all weights), trainer.pt
#                            (optimizer, scheduler, loss scale, Progress, config), rng-rank{r}.pt (every random
#                            stream of rank r); plain tensors and containers: torch.load(weights_only=True)
# out_dir/latest.json        {"dir": "ckpt/step-000120", "step": 120}, written once that directory is complete
# out_dir/best.json          {"dir", "score", "step"}: for people; Progress.best_dir keeps that directory
# out_dir/final/             the exported model: Hugging Face layout, or adapter.safetensors (lora_export="adapter")
# The data position is a function of the step (global_batch_indices): nothing to save.

def _ckpt_name(step: int) -> str:
    return f"ckpt/step-{step:06d}"


def save_time_due(run: Run, minutes: float, since: float) -> bool:
    """Have `minutes` (0: never) passed since time.monotonic() was `since`? Rank 0's clock answers for every rank:
    all ranks must enter save_checkpoint together."""
    if not minutes:
        return False
    due = time.monotonic() - since >= 60 * minutes
    if run.world > 1:
        flag = torch.tensor([int(due)], device=run.device)
        dist.broadcast(flag, 0)
        due = bool(flag.item())
    return due


def save_checkpoint(run: Run, model: nn.Module, progress: Progress, cfg: TrainConfig, new_best: bool) -> None:
    """Write ckpt/step-N atomically, then latest.json (and best.json) naming it; prune the others. All ranks call
    this: rank 0 writes the directory, then each rank adds its own random streams (dropout differs per rank)."""
    name = _ckpt_name(progress.step)
    if run.rank == 0:
        with atomic_path(run.out_dir / name) as tmp:
            tmp.mkdir()
            save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()},
                      str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                        "scaler": run.scaler.state_dict(), **dataclasses.asdict(progress),
                        "config": dataclasses.asdict(cfg)}, tmp / "trainer.pt")
    _barrier(run.world)
    np_name, np_keys, *np_rest = np.random.get_state()  # np_keys: a uint32 array, saved as an int64 tensor
    rng = {"python": random.getstate(), "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), *np_rest],
           "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    with atomic_path(run.out_dir / name / f"rng-rank{run.rank}.pt") as tmp:
        torch.save(rng, tmp)
    _barrier(run.world)
    if run.rank == 0:
        write_json(run.out_dir / "latest.json", {"dir": name, "step": progress.step})
        if new_best:
            write_json(run.out_dir / "best.json", {"dir": name, "score": progress.best_score, "step": progress.step})
        keep = {name, progress.best_dir}  # best_dir, not best.json: a resumed run's Progress is exact and current
        for d in (run.out_dir / "ckpt").glob("step-*"):  # only the latest and the best are kept
            if str(d.relative_to(run.out_dir)) not in keep:
                shutil.rmtree(d, ignore_errors=True)
    _barrier(run.world)


def resume(run: Run, model: nn.Module, cfg: TrainConfig) -> Progress:
    """Seed the random streams (per rank); with cfg.resume, restore the latest checkpoint: weights, optimizer,
    schedule, loss scale, progress and this rank's random streams (the data position follows from the step)."""
    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(cfg.seed + run.rank)  # dropout streams differ per rank
    latest = run.out_dir / "latest.json"
    if not (cfg.resume and latest.exists()):
        if cfg.resume and run.rank == 0:
            if any((run.out_dir / "ckpt").glob("step-*")):  # checkpoints, but none completed: say why they are unused
                print(f"dpo.py: {latest} does not exist (no checkpoint completed); starting from step 0",
                      file=sys.stderr)
            trim_log(run.out_dir / "log.jsonl", 0)
        return Progress()
    ckpt = run.out_dir / read_pointer(latest)["dir"]
    load_trainable(model, ckpt)
    state = load_plain(ckpt / "trainer.pt")
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    if (ckpt / f"rng-rank{run.rank}.pt").exists():  # absent when the run saved with fewer ranks
        rng = load_plain(ckpt / f"rng-rank{run.rank}.pt")
        version, mt, gauss = rng["python"]
        random.setstate((version, tuple(mt), gauss))  # tuple(): earlier checkpoints stored a list
        np_name, np_keys, *np_rest = rng["numpy"]
        np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), *np_rest))
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    if run.rank == 0:
        print(f"dpo.py: resumed from {ckpt} at step {state['step']}", file=sys.stderr)
        trim_log(run.out_dir / "log.jsonl", state["step"])
    return Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})


def read_pointer(path: Path) -> dict:
    """latest.json: {"dir": ..., "step": ...}; a damaged one is named in one error, not in a JSON traceback."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        obj = None
    if not (isinstance(obj, dict) and isinstance(obj.get("dir"), str)):
        raise ValueError(f'{path}: corrupt, expected {{"dir": "ckpt/step-N", "step": N}}; point it at a complete '
                         "ckpt/step-* directory or delete it to start over")
    return obj


def load_trainable(model: nn.Module, ckpt_dir: Path):
    """Copy trainable.safetensors into the model; the names and every shape must match exactly."""
    path = ckpt_dir / "trainable.safetensors"
    try:
        saved = load_file(str(path))
    except SafetensorError as e:  # empty, truncated or not safetensors at all
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    params = _trainable(model)
    wrong = sorted(set(saved) ^ set(params)) or [n for n, p in params.items() if saved[n].shape != p.shape]
    if wrong:  # names on one side only, else names whose shapes differ
        raise ValueError(f"{path} does not fit the model at {wrong[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])


def export_model(model: nn.Module, out: Path, lora_export: str = "merged", add_files: Callable | None = None):
    """Write the model for use outside training, atomically: Hugging Face layout (model.save_model folds LoRA
    into the weights without touching the model), and with LoRA the fp32 adapters beside it (the base + these
    is the trained model exactly; a merge into bf16 weights rounds a small delta away), or the adapters alone.
    add_files(dir) may add files (a tokenizer, a generation config) before the directory appears under its name."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if has_lora(model):
            save_lora(model, tmp / "adapter.safetensors")
        if getattr(model, "soft_prompt", None) is not None:   # prompt tuning: the vectors beside the frozen weights
            save_soft_prompt(model, tmp / SOFT_PROMPT_DIR)
        if not (has_lora(model) and lora_export == "adapter"):
            save_model(model, tmp)
        if add_files is not None:
            add_files(tmp)


def train(model: nn.Module, cfg: TrainConfig, train_features: list[dict], collate: Callable,
          eval_fn: Callable[[nn.Module], float | dict] | None = None, ref_model: nn.Module | None = None,
          export: bool = True, export_files: Callable[[Path], None] | None = None) -> dict:
    """Train `model` in place on `train_features` (encoded dicts of lists) batched by `collate` into
    {"input_ids", "labels"} (B, T) for SFT, or {"chosen_input_ids", "chosen_labels", "rejected_input_ids",
    "rejected_labels"} for DPO, whose reference is `ref_model` (a frozen copy) or, when None, the policy with
    LoRA off. eval_fn(model) -> score (or a dict with "score"; higher is better) runs on rank 0 every
    cfg.eval_every steps and drives the best checkpoint and early stopping. Under torchrun it starts the process
    group itself. The exported model (out_dir/final) gets export_files(dir)'s files too. Returns {"step",
    "best_score", "best_dir", "final_dir", "stopped_early"}."""
    run = set_up(model, cfg, len(train_features), ref_model)
    progress = resume(run, model, cfg)
    ref_cache = None  # DPO reference log-probs of every pair, computed once (the model's train mode is kept)
    if run.dpo and cfg.reference == "cache":
        ref_cache = cached_reference_logps(model, ref_model, train_features, collate, run.out_dir / "ref_logps.pt",
                                           cfg.batch_size, run.autocast, run.device, run.rank, run.world,
                                           cfg.precision)
    lengths = row_lengths(train_features, run.dpo) if cfg.group_by_length else None  # (N,) for batching
    stop_at = min(run.total_steps, cfg.stop_at) if cfg.stop_at is not None else run.total_steps
    bar = tqdm(total=run.total_steps, initial=progress.step, desc=cfg.mode, dynamic_ncols=True,
               disable=run.rank != 0 or not cfg.progress)
    sums, stopped_early = RunningSums(), False
    last_save = time.monotonic()  # cfg.save_minutes counts from the start and from each checkpoint
    while progress.step < stop_at and not stopped_early:
        idx = global_batch_indices(len(train_features), run.global_batch, cfg.seed, progress.step, lengths)
        lr, grad_norm = optimizer_step(run, cfg, model, train_features, collate, idx, ref_model, ref_cache, sums)
        progress.step += 1
        step = progress.step
        if step % cfg.log_every == 0 or step == stop_at:
            rec = log_record(run, step, lr, grad_norm, sums)
            write_log(run, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            sums = RunningSums()
        bar.update(1)
        new_best = False
        if eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == run.total_steps):
            new_best, stopped_early = progress.record(evaluate(run, model, eval_fn, step), cfg.patience)
        # every rank agrees on each term; the clock is asked at log lines only (under torchrun its answer is a
        # broadcast that the CPU waits for, as it waits for the log line's sums)
        if (new_best or (cfg.save_every and step % cfg.save_every == 0) or step == stop_at or stopped_early
                or (step % cfg.log_every == 0 and save_time_due(run, cfg.save_minutes, last_save))):
            save_checkpoint(run, model, progress, cfg, new_best)
            last_save = time.monotonic()
    bar.close()

    final_dir = None  # export: the best weights when there was an evaluation, else the last ones
    if export and (progress.step >= run.total_steps or stopped_early):
        if cfg.export_best and progress.best_dir is not None:
            load_trainable(model, run.out_dir / progress.best_dir)
        if run.rank == 0:
            final_dir = run.out_dir / "final"
            export_model(model, final_dir, cfg.lora_export, export_files)
        _barrier(run.world)
    return {"step": progress.step, "best_score": progress.best_score, "best_dir": progress.best_dir,
            "final_dir": final_dir, "stopped_early": stopped_early}
