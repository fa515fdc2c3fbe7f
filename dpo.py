"""SFT and DPO for PAL, from the losses to the training loop that runs them on one CPU or under torchrun.

Read top to bottom:
  1. losses       pure functions of tensors: sequence_logps -> sft_loss -> dpo_loss
  2. log-probs    of a model on a batch; chosen and rejected in one forward
  3. reference    DPO's reference log-probs: a frozen copy, the policy with its LoRA adapters off, or the policy as
                  it starts (adapters it continues to train, frozen at their start values); cached once
  4. training     TrainConfig, the data order, set_up, one optimizer step, train()
  appendix        chunked log-probs: the same numbers without the (B, T, V) logits (opt-in: logps="chunked")

A batch is right-padded; labels are IGNORE (-100) on prompt and padding; the label at position t is the token
the model should predict *from* position t-1 (Hugging Face convention), so every loss shifts by one. Checkpoints,
logs and the process group are infra/ (ckpt, files, dist): a reader steps over those calls.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import infra.dist
from data import IGNORE
from infra import ckpt
from infra.files import append_jsonl, atomic_path
from infra.hub import read_safetensors
from infra.options import check_precision
from infra.trainlog import FirstNonFinite, RunningSums, log_record
from model import SOFT_PROMPT_DIR, lora_disabled, save_lora, save_model, save_soft_prompt


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
# 2. Log-probs of a model on a batch.

def model_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (B,), ntokens (B,)) of a causal LM on a right-padded batch (no attention mask needed: causal).
    model(input_ids) -> logits (B, T, V), then sequence_logps. chunked=True (our GPT2 / Llama, which can return
    their final hidden states): the appendix's path, which never holds the (B, T, V) logits."""
    if chunked and getattr(model, "family", None) is not None:
        return target_logps(model(input_ids, hidden_only=True), model.output_weight, labels)
    return sequence_logps(model(input_ids), labels)


class LogpModel(nn.Module):
    """Wraps a causal LM so that forward() returns (logps, ntokens): DDP must see the call that builds the graph."""

    def __init__(self, lm: nn.Module, chunked: bool = False):
        super().__init__()
        self.lm, self.chunked = lm, chunked

    def forward(self, input_ids, labels):
        return model_logps(self.lm, input_ids, labels, self.chunked)


def concatenated_forward(model: nn.Module, batch: dict, chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected together -> (chosen_logps (B,), rejected_logps (B,)). The halves,
    (B, Tc) and (B, Tr), are right-padded to T = max(Tc, Tr) (pad id 0 is never a target) and stacked to (2B, T):
    one pass, one graph. `model` is a causal LM or a LogpModel (possibly DDP-wrapped: it brings its own path)."""
    t = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key: str, value: int) -> torch.Tensor:  # (2B, T)
        return torch.cat([F.pad(batch[f"{half}_{key}"], (0, t - batch[f"{half}_{key}"].shape[1]), value=value)
                          for half in ("chosen", "rejected")])

    ids, labels = both("input_ids", 0), both("labels", IGNORE)
    is_logp_model = isinstance(getattr(model, "module", model), LogpModel)
    logps, _ = model(ids, labels) if is_logp_model else model_logps(model, ids, labels, chunked)
    b = batch["chosen_input_ids"].shape[0]
    return logps[:b], logps[b:]


# ----------------------------------------------------------------------------------------------------------
# 3. Reference log-probs for DPO.

def has_lora(model: nn.Module) -> bool:
    """True when the trainable parameters are LoRA adapters (names from model.add_lora contain 'lora_')."""
    return any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@torch.no_grad()
def reference_logps(ref: nn.Module | None, policy: nn.Module, batch: dict, chunked: bool = False,
                    adapters: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (chosen, rejected) log-probs: from `ref` (a frozen copy) or, when None, from the policy with
    its LoRA adapters switched off (the base model *is* the reference: no second copy in memory), or with
    adapters=True from the policy as it is (only right before its first step: cached_reference_logps)."""
    if ref is not None:
        return concatenated_forward(ref, batch, chunked)
    with contextlib.nullcontext() if adapters else lora_disabled(policy):
        return concatenated_forward(policy, batch, chunked)


def _fingerprint(model: nn.Module, features: list[dict], precision: str, adapters: bool = False) -> str:
    """Identity of a reference cache: the pairs' token ids, the reference weights (names, shapes and two float64
    moments per tensor; the adapters count only when the reference keeps them on), the precision."""
    h = hashlib.sha256()
    for f in features:
        for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            h.update(np.asarray(f[k], dtype=np.int64).tobytes() + b"|")
    for name, t in model.state_dict().items():
        if adapters or "lora_" not in name:
            t64 = t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{t64.sum().item():.12e}{t64.abs().sum().item():.12e}".encode())
    return h.hexdigest() + precision


def cached_reference_logps(policy: nn.Module, ref: nn.Module | None, features: list[dict], collate: Callable,
                           cache_path: str | os.PathLike, batch_size: int = 8, autocast=contextlib.nullcontext,
                           device="cpu", rank: int = 0, world: int = 1, precision: str = "fp32",
                           chunked: bool = False, adapters: bool = False) -> torch.Tensor:
    """Reference log-probs of every DPO pair, (N, 2) fp32 (chosen, rejected), computed once and stored at
    cache_path with a key of (features, reference weights, precision: the name of what `autocast` does); a stale
    cache is recomputed. Under DDP each rank computes every world-th pair and the parts are summed. adapters: the
    reference is the policy with its LoRA adapters on, as they are now (call it before the first step)."""
    key = _fingerprint(ref if ref is not None else policy, features, precision, adapters and ref is None)
    cached = ckpt.read_cached_logps(Path(cache_path), key, (len(features), 2))
    if cached is not None:
        return cached
    out = torch.zeros(len(features), 2, dtype=torch.float32)
    mine = list(range(rank, len(features), world))
    was_training = policy.training
    policy.eval()
    for s in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", disable=rank != 0):
        idx = mine[s:s + batch_size]
        batch = _to_device(collate([features[i] for i in idx]), device)
        with autocast():
            c, r = reference_logps(ref, policy, batch, chunked, adapters)
        out[idx, 0], out[idx, 1] = c.float().cpu(), r.float().cpu()
    policy.train(was_training)
    if world > 1:  # each pair was computed by exactly one rank; the others hold zeros
        out = infra.dist.sum_across(out.to(device)).cpu()
    if rank == 0:
        ckpt.write_cached_logps(Path(cache_path), key, out)
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
    lora_plus_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): the B matrices learn at this times lr (1: off)
    optimizer: str = "adamw"  # "adamw" | "rmsprop"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "constant"  # after warmup: "constant" | "linear" (decay to 0 at the last step)
    grad_clip: float | None = 1.0  # max global gradient norm (None or 0: no clipping)
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, CPU or GPU) | "fp16" (autocast + loss scaling, GPU)
    sft_reduction: str = "sum"  # "sum": NLL summed per sequence (PAL) | "mean": per target token
    beta: float = 0.1  # DPO temperature
    reference: str = "cache"  # DPO reference: "cache" (precomputed once) | "live" (computed each step)
    reference_adapters: bool = False  # no ref_model: the reference is the policy with its start adapters on, not off
    logps: str = "plain"  # "plain": log-softmax of the full logits | "chunked": the appendix's memory-saving path
    recompute: bool = False  # activation checkpointing: each block recomputed in backward (less memory, same numbers)
    dropout: bool | None = None  # None: on for SFT, off for DPO (policy and reference must agree)
    eval_every: int = 0  # optimizer steps between eval_fn calls (0: never)
    patience: int = 0  # stop after this many evals without a better score (0: never stop early)
    save_every: int = 0  # optimizer steps between checkpoints (0: only at the end and on a new best)
    save_minutes: float = 0.0  # also a checkpoint when this many minutes passed since the last one (0: off)
    keep_steps: tuple[int, ...] = ()  # steps whose checkpoints are written and never deleted (Figure 4's sweep)
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
                  "reference": ("cache", "live"), "lora_export": ("merged", "adapter"), "logps": ("plain", "chunked")}
        for k, allowed in checks.items():
            if getattr(self, k) not in allowed:
                raise ValueError(f"TrainConfig.{k} must be one of {allowed}, got {getattr(self, k)!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("TrainConfig.batch_size and grad_accum must be >= 1")
        for k in ("save_every", "save_minutes"):
            if not getattr(self, k) >= 0:  # written so that NaN fails too
                raise ValueError(f"TrainConfig.{k} must be >= 0 (0: off), got {getattr(self, k)!r}")
        if not self.lora_plus_ratio > 0:
            raise ValueError(f"TrainConfig.lora_plus_ratio must be > 0, got {self.lora_plus_ratio!r}")
        if self.reference_adapters and self.reference != "cache":  # a live reference would follow the training
            raise ValueError("TrainConfig.reference_adapters needs reference='cache' (computed before the first step)")
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


def param_groups(model: nn.Module, lr: float, lora_plus_ratio: float = 1.0) -> list[dict]:
    """The optimizer's parameter groups. LoRA+ (ratio != 1): every LoRA B matrix at lr * ratio, everything else
    trainable at lr, as PEFT's create_loraplus_optimizer groups a LoRA model (the authors' trainers.py, ratio 16;
    PEFT also counts 1-D parameters as "B", which a LoRA model here never trains). Ratio 1: one group, the plain
    optimizer (and the layout of checkpoints written before LoRA+)."""
    named = _trainable(model)
    if not named:
        raise ValueError("dpo.py: the model has no trainable parameters")
    b = [p for n, p in named.items() if n.endswith("lora_B")]
    if lora_plus_ratio == 1 or not b:
        return [{"params": list(named.values()), "lr": lr}]
    rest = [p for n, p in named.items() if not n.endswith("lora_B")]
    return [{"params": rest, "lr": lr}, {"params": b, "lr": lr * lora_plus_ratio}]


def set_up(model: nn.Module, cfg: TrainConfig, n_examples: int, ref_model: nn.Module | None) -> Run:
    """Device and process group (torchrun: nccl on GPU, gloo on CPU), precision, optimizer, lr schedule, DDP."""
    infra.dist.start(cfg.dist_timeout_min)  # under torchrun; a caller's process group is kept
    rank, world = infra.dist.rank_world()
    device = infra.dist.local_device() if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current GPU, named by its index (set_device needs one)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    out_dir = Path(cfg.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dpo = cfg.mode == "dpo"
    if dpo and ref_model is None and not has_lora(model):
        raise ValueError("dpo.py: DPO with full fine-tuning needs ref_model (a frozen copy of the start weights)")
    warn = (lambda msg: print(f"dpo.py: {msg}", file=sys.stderr)) if rank == 0 else (lambda msg: None)
    check_precision(cfg.precision, device.type, _trainable(model), warn)  # infra/options.py
    model.to(device).train(cfg.dropout if cfg.dropout is not None else not dpo)  # train(False) = dropout off
    model.recompute = cfg.recompute  # model.run_block
    if ref_model is not None:
        ref_model.to(device).eval().requires_grad_(False)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    params = param_groups(model, cfg.lr, cfg.lora_plus_ratio)
    if cfg.optimizer == "adamw":
        # fused on a GPU: one kernel for every parameter's update (the same arithmetic as the loop of kernels)
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                fused=device.type == "cuda")
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

    net = LogpModel(model, cfg.logps == "chunked")  # forward(input_ids, labels) -> (logps, ntokens): the unit DDP syncs
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
            self.best_score, self.bad_evals, self.best_dir = score, 0, ckpt.ckpt_name(self.step)
            return True, False
        self.bad_evals += 1
        return False, patience > 0 and self.bad_evals >= patience


def optimizer_step(run: Run, cfg: TrainConfig, model: nn.Module, features: list[dict], collate: Callable,
                   idx: list[int], ref_model: nn.Module | None, ref_cache: torch.Tensor | None,
                   sums: RunningSums) -> tuple[float, torch.Tensor | None]:
    """One update from the global batch `idx`: this rank's micro-batches, gradients accumulated, clipped, applied.
    -> (lr, grad norm: a 0-d tensor, read when logged). Nothing is read off the device here."""
    # the step's loss is normalized over the whole global batch, so that 1 process x 8 sequences and
    # 2 processes x 4 sequences take the same step: per sequence (pair), or per target token
    per_token = not run.dpo and cfg.sft_reduction == "mean"
    norm = sum(sum(y != IGNORE for y in features[i]["labels"][1:]) if per_token else 1 for i in idx)
    for micro in range(cfg.grad_accum):
        lo = (micro * run.world + run.rank) * cfg.batch_size
        rows = idx[lo:lo + cfg.batch_size]
        batch = _to_device(collate([features[i] for i in rows]), run.device)
        last = micro == cfg.grad_accum - 1  # DDP all-reduces gradients once, in the last micro-step's backward
        with contextlib.nullcontext() if run.world == 1 or last else run.net.no_sync():
            with run.autocast():
                if run.dpo:
                    loss_sum = dpo_batch_loss(run, cfg, model, batch, rows, ref_model, ref_cache, sums)
                else:
                    loss_sum = -run.net(batch["input_ids"], batch["labels"])[0].sum()
            # DDP averages gradients over ranks, hence * world: the step's loss is sum / norm overall
            run.scaler.scale(loss_sum * run.world / norm).backward()
        sums.add_batch(loss_sum, features, rows, batch, run.dpo)
    sums.units += norm
    grad_norm = None
    if cfg.grad_clip:
        run.scaler.unscale_(run.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in run.opt.param_groups for p in g["params"]],
                                                   cfg.grad_clip)  # one norm over every group, as the authors
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else None  # fp16: the loss scale of this step
    run.scaler.step(run.opt)
    run.scaler.update()
    if scale is not None:  # GradScaler lowers its scale exactly when it skipped the update (inf/NaN gradients)
        sums.skipped_steps = (sums.skipped_steps or 0) + int(run.scaler.get_scale() < scale)
    run.opt.zero_grad(set_to_none=True)
    lr = run.sched.get_last_lr()[0]
    run.sched.step()
    return lr, grad_norm


def dpo_batch_loss(run: Run, cfg: TrainConfig, model: nn.Module, batch: dict, rows: list[int],
                   ref_model: nn.Module | None, ref_cache: torch.Tensor | None, sums: RunningSums) -> torch.Tensor:
    """The summed DPO loss of one micro-batch; its rewards are added to the log's running sums."""
    pc, pr = concatenated_forward(run.net, batch)
    # non_blocking: a blocking copy to the GPU would first wait for everything queued there
    rc, rr = (ref_cache[rows].to(run.device, non_blocking=True).unbind(1) if ref_cache is not None
              else reference_logps(ref_model, model, batch, cfg.logps == "chunked"))
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, cfg.beta)
    sums.add_rewards(chosen_r, rejected_r)
    return losses.sum()


def write_log(run: Run, rec: dict):
    """Append one JSON line to out_dir/log.jsonl (rank 0 writes the log)."""
    if run.rank == 0:
        append_jsonl(run.out_dir / "log.jsonl", rec)


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
    return infra.dist.from_rank0(score).item()


# Checkpoints: infra/ckpt.py writes and reads them (what is where: its docstring). The data position is a function
# of the step (global_batch_indices): nothing to save.

def save_time_due(run: Run, minutes: float, since: float) -> bool:
    """Have `minutes` (0: never) passed since time.monotonic() was `since`? Rank 0's clock answers for every rank:
    all ranks must enter save_checkpoint together."""
    if not minutes:
        return False
    due = torch.tensor([int(time.monotonic() - since >= 60 * minutes)], device=run.device)
    return bool(infra.dist.from_rank0(due).item())


def save_checkpoint(run: Run, model: nn.Module, progress: Progress, cfg: TrainConfig, new_best: bool) -> None:
    """Everything the run needs to go on exactly: trained tensors, optimizer, schedule, loss scale, progress, config,
    every rank's random streams. The latest checkpoint, the best one and those of cfg.keep_steps are kept."""
    state = {"optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
             "scaler": run.scaler.state_dict(), **dataclasses.asdict(progress), "config": dataclasses.asdict(cfg)}
    kept = {progress.best_dir} | {ckpt.ckpt_name(s) for s in cfg.keep_steps}
    ckpt.save(run.out_dir, progress.step, _trainable(model), state, keep=kept,
              best_score=progress.best_score if new_best else None)


def resume(run: Run, model: nn.Module, cfg: TrainConfig) -> Progress:
    """Seed the random streams (per rank: dropout differs); with cfg.resume, restore the latest checkpoint: weights,
    optimizer, schedule, loss scale, progress and this rank's random streams (the data position follows from the
    step)."""
    ckpt.seed_all(cfg.seed + run.rank)
    found = ckpt.latest(run.out_dir) if cfg.resume else None
    if found is None:
        return Progress()
    tensors, state = ckpt.load(found)
    load_trainable(model, found, tensors)
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    return Progress(**{f.name: state[f.name] for f in dataclasses.fields(Progress)})


def load_trainable(model: nn.Module, ckpt_dir: Path, saved: dict[str, torch.Tensor] | None = None):
    """Copy a checkpoint's trainable.safetensors (or `saved`, its tensors already read) into the model; the names
    and every shape must match exactly."""
    path = Path(ckpt_dir) / "trainable.safetensors"
    saved = read_safetensors(path) if saved is None else saved
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
    add_files(dir) may add files (a tokenizer, a generation config) before the directory appears under its name.
    Weights holding NaN or inf are refused: they would reply "!!!!!" and score a row that looks like a result."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(f"{out}: not exported: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]})")
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


def stop_if_nonfinite(run: Run, cfg: TrainConfig, first: int | None) -> None:
    """Training cannot go on from NaN or inf: stop, naming the step; nothing after it was saved or exported."""
    if first is not None:
        pointer = run.out_dir / "latest.json"
        kept = run.out_dir / ckpt.read_pointer(pointer)["dir"] if pointer.exists() else None
        raise FloatingPointError(
            f"{cfg.mode}: the loss or gradient norm is not finite (NaN or inf) at step {first} in {run.out_dir}; "
            f"stopped, nothing exported, the last good checkpoint is {kept or 'none (step 0)'}: lower the learning "
            "rate (or check the data) and start again")


def train(model: nn.Module, cfg: TrainConfig, train_features: list[dict], collate: Callable,
          eval_fn: Callable[[nn.Module], float | dict] | None = None, ref_model: nn.Module | None = None,
          export: bool = True, export_files: Callable[[Path], None] | None = None) -> dict:
    """Train `model` in place on `train_features` (encoded dicts of lists) batched by `collate` into
    {"input_ids", "labels"} (B, T) for SFT, or {"chosen_input_ids", "chosen_labels", "rejected_input_ids",
    "rejected_labels"} for DPO, whose reference is `ref_model` (a frozen copy) or, when None, the policy with
    LoRA off (with cfg.reference_adapters: the policy as it starts, adapters on). eval_fn(model) -> score (or a
    dict with "score"; higher is better) runs on rank 0 every cfg.eval_every steps and drives the best checkpoint
    and early stopping. Under torchrun it starts the process
    group itself. The exported model (out_dir/final) gets export_files(dir)'s files too. Returns {"step",
    "best_score", "best_dir", "final_dir", "stopped_early"}."""
    run = set_up(model, cfg, len(train_features), ref_model)
    ref_cache = None  # DPO reference log-probs of every pair, computed once (the model's train mode is kept),
    if run.dpo and cfg.reference == "cache":  # from the start weights: before resume() loads trained ones
        ref_cache = cached_reference_logps(model, ref_model, train_features, collate, run.out_dir / "ref_logps.pt",
                                           cfg.batch_size, run.autocast, run.device, run.rank, run.world,
                                           cfg.precision, cfg.logps == "chunked", cfg.reference_adapters)
    progress = resume(run, model, cfg)
    lengths = row_lengths(train_features, run.dpo) if cfg.group_by_length else None  # (N,) for batching
    stop_at = min(run.total_steps, cfg.stop_at) if cfg.stop_at is not None else run.total_steps
    bar = tqdm(total=run.total_steps, initial=progress.step, desc=cfg.mode, dynamic_ncols=True,
               disable=run.rank != 0 or not cfg.progress)
    sums, stopped_early = RunningSums(), False
    nonfinite = FirstNonFinite(run.device, check_grad_norm=cfg.precision != "fp16")
    last_save = time.monotonic()  # cfg.save_minutes counts from the start and from each checkpoint
    while progress.step < stop_at and not stopped_early:
        idx = global_batch_indices(len(train_features), run.global_batch, cfg.seed, progress.step, lengths)
        lr, grad_norm = optimizer_step(run, cfg, model, train_features, collate, idx, ref_model, ref_cache, sums)
        progress.step += 1
        step = progress.step
        nonfinite.add(step, sums.loss, grad_norm)
        logged = step % cfg.log_every == 0 or step == stop_at
        evaluated = eval_fn is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == run.total_steps)
        if logged or evaluated or (cfg.save_every and step % cfg.save_every == 0) or step in cfg.keep_steps:
            # before anything is written
            stop_if_nonfinite(run, cfg, nonfinite.step())
        if logged:
            rec = log_record(sums, step, lr, grad_norm, run.device, run.steps_per_epoch, run.dpo)
            write_log(run, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            sums = RunningSums()
        bar.update(1)
        new_best = False
        if evaluated:
            new_best, stopped_early = progress.record(evaluate(run, model, eval_fn, step), cfg.patience)
        # every rank agrees on each term; the clock is asked at log lines only (under torchrun its answer is a
        # broadcast that the CPU waits for, as it waits for the log line's sums)
        if (new_best or (cfg.save_every and step % cfg.save_every == 0) or step in cfg.keep_steps
                or step == stop_at or stopped_early or (logged and save_time_due(run, cfg.save_minutes, last_save))):
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
        infra.dist.barrier()
    return {"step": progress.step, "best_score": progress.best_score, "best_dir": progress.best_dir,
            "final_dir": final_dir, "stopped_early": stopped_early}


# ----------------------------------------------------------------------------------------------------------
# Appendix: chunked log-probs, the numbers of sequence_logps without the (B, T, V) logits (TrainConfig.logps =
# "chunked"; pal.py --logps chunked; the smol preset uses it: docs/measurements.md has the figure).
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
