"""Training logs: sums kept on the device between log lines (reading a value off a GPU makes the CPU wait for
all the work queued there), and the record of one log line, averaged over every rank."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from infra.dist import min_across, sum_across


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
    skipped_steps: int | None = None  # fp16: steps whose update the loss scaler skipped (None: no loss scaling)
    since: float = dataclasses.field(default_factory=time.perf_counter)

    def add_rewards(self, chosen: torch.Tensor, rejected: torch.Tensor):
        self.correct += (chosen > rejected).sum().double()
        self.margin += (chosen - rejected).sum().double()
        self.chosen += chosen.sum().double()
        self.rejected += rejected.sum().double()

    def add_batch(self, loss_sum: torch.Tensor, features: list[dict], rows: list[int], batch: dict, dpo: bool):
        keys = ("chosen_input_ids", "rejected_input_ids") if dpo else ("input_ids",)
        self.loss += loss_sum.detach().double()
        self.real_tokens += sum(len(features[i][k]) for i in rows for k in keys)
        self.padded_tokens += len(rows) * len(keys) * max(batch[k].shape[1] for k in keys)  # DPO halves: one width


def log_record(sums: RunningSums, step: int, lr: float, grad_norm: torch.Tensor | None, device: torch.device,
               steps_per_epoch: int, dpo: bool) -> dict:
    """One log line: the running sums of every rank, averaged over the units they were normalized by; the share of
    real (not padding) tokens in what the model ran. The one place the training loop reads values off the device."""
    names = ("loss", "correct", "margin", "chosen", "rejected", "real_tokens", "padded_tokens")
    t = torch.stack([torch.as_tensor(getattr(sums, k), dtype=torch.float64, device=device) for k in names])
    sum_across(t)  # units is the same on every rank: only the other sums are added up
    s = dict(zip(names, t.tolist()))
    grad_norm = None if grad_norm is None else grad_norm.item()  # the same on every rank (after DDP's all-reduce)
    seconds = max(time.perf_counter() - sums.since, 1e-9)  # after the reads: the GPU has done the work it was given
    n = max(sums.units, 1)
    rec = {"step": step, "epoch": step / max(steps_per_epoch, 1), "lr": lr, "loss": s["loss"] / n,
           "grad_norm": grad_norm, "tokens_per_s": s["padded_tokens"] / seconds,
           "real_token_share": s["real_tokens"] / max(s["padded_tokens"], 1)}
    if sums.skipped_steps is not None:  # the same on every rank (gradients are all-reduced before the check)
        rec["skipped_steps"] = sums.skipped_steps
    if dpo:
        rec.update(reward_accuracy=s["correct"] / n, reward_margin=s["margin"] / n,
                   chosen_reward=s["chosen"] / n, rejected_reward=s["rejected"] / n)
    return rec


class FirstNonFinite:
    """The first optimizer step whose loss or gradient norm was NaN or inf, kept on the device (a check per step would
    make the CPU wait for the GPU every step); read at log lines, evaluations and checkpoints, before anything is
    written, so that no log line, checkpoint or export ever holds a non-finite value."""
    NONE = 2 ** 62

    def __init__(self, device: torch.device, check_grad_norm: bool = True):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.check_grad_norm = check_grad_norm  # False under fp16 loss scaling: inf gradients are skipped steps there

    def add(self, step: int, loss_sum: torch.Tensor | float, grad_norm: torch.Tensor | None) -> None:
        """Note step `step`: loss_sum is the running loss since the last log line (non-finite from the first bad
        step on), grad_norm the step's (None: not computed)."""
        bad = ~torch.isfinite(torch.as_tensor(loss_sum, device=self.first.device))
        if grad_norm is not None and self.check_grad_norm:
            bad = bad | ~torch.isfinite(grad_norm)
        self.first = torch.where(bad & (self.first == self.NONE), step, self.first)

    def step(self) -> int | None:
        """The first non-finite step over every rank, or None. Reads the device (and waits for the other ranks)."""
        first = int(min_across(self.first.clone()).item())
        return None if first == self.NONE else first
