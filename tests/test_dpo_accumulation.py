"""Gradient accumulation against a hand-made optimizer step (issue 25: a second division by grad_accum cancels
when both sides of a comparison accumulate the same way; here one side does not accumulate at all, and a third is
written out by hand with torch.nn.functional.cross_entropy and torch.optim.AdamW)."""
import math

import pytest
import torch
import torch.nn.functional as F

import dpo
from conftest import collate_sft, log_records, sft_features, tiny_llama, trained

LR, EPS = 1e-2, 1.0  # eps this large makes AdamW's first step ~ lr * g: a wrongly scaled gradient moves W differently


def hand_step(feats: list[dict], reduction: str, clip_ratio: float) -> tuple[float, float, dict]:
    """One optimizer step over all of `feats` as one batch, written from the definitions.
    -> (loss, gradient norm before clipping, the weights after the step)."""
    model = tiny_llama()
    total, units = 0.0, 0
    for f in feats:
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        logits = model(ids)[0, :-1]  # (T-1, V): position t predicts token t+1
        total = total + F.cross_entropy(logits.float(), labels[0, 1:], ignore_index=-100, reduction="sum")
        units += int((labels[0, 1:] != -100).sum()) if reduction == "mean" else 1
    loss = total / units
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))
    clip = clip_ratio * norm
    for p in params:  # clipping as torch does it: scale by clip / (norm + 1e-6) when that is below 1
        p.grad.mul_(min(1.0, clip / (norm + 1e-6)))
    torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0.0).step()
    return float(loss.detach()), norm, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_accumulated_step_equals_one_batch_and_the_hand_step(tmp_path, reduction):
    feats = sft_features(4)
    loss, norm, weights = hand_step(feats, reduction, clip_ratio=0.75)  # clipping active: 0.75 of the true norm
    start = tiny_llama().state_dict()
    runs = {}
    for batch, accum in ((2, 2), (4, 1)):
        out = tmp_path / f"b{batch}x{accum}"
        cfg = dpo.TrainConfig(mode="sft", out_dir=str(out), batch_size=batch, grad_accum=accum, max_steps=1, lr=LR,
                              eps=EPS, warmup_steps=0, grad_clip=0.75 * norm, sft_reduction=reduction,
                              progress=False, device="cpu")
        dpo.train(tiny_llama(), cfg, feats, collate_sft, export=False)
        (rec,) = [r for r in log_records(out) if "loss" in r]
        runs[(batch, accum)] = (rec, trained(out, 1))
    for (batch, accum), (rec, w) in runs.items():
        where = f"grad_accum {accum} x batch {batch}"
        assert rec["loss"] == pytest.approx(loss, rel=1e-5), where
        assert rec["grad_norm"] == pytest.approx(norm, rel=1e-4), where  # the norm before clipping
        assert set(w) <= set(weights)
        moved = 0
        for k in w:
            torch.testing.assert_close(w[k], weights[k], atol=1e-6, rtol=1e-5, msg=f"{where}: {k}")
            moved += int(not torch.equal(w[k], start[k]))
        assert moved == len(w)  # the step changed every trained tensor: the comparison is not between no-ops
