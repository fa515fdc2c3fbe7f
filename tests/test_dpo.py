"""Losses of dpo.py against hand-derived values, manual loops and finite differences."""
import math

import pytest
import torch

import dpo


def test_dpo_loss_hand_computed():
    # pair 1, beta 0.1: chosen log-ratio -10 - (-11) = 1, rejected -12 - (-11) = -1, margin 2,
    #   loss = -log sigmoid(0.1 * 2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694
    # pair 2: chosen log-ratio 0, rejected log-ratio -4 - (-6) = 2, margin -2,
    #   loss = -log sigmoid(-0.2) = log(1 + e^0.2) = log(2.2214027582) = 0.7981388694
    pc = torch.tensor([-10.0, -5.0])
    pr = torch.tensor([-12.0, -4.0])
    rc = torch.tensor([-11.0, -5.0])
    rr = torch.tensor([-11.0, -6.0])
    losses, cr, rj = dpo.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert losses.tolist() == pytest.approx([0.5981388694, 0.7981388694], abs=1e-7)
    assert cr.tolist() == pytest.approx([0.1, 0.0], abs=1e-7)
    assert rj.tolist() == pytest.approx([-0.1, 0.2], abs=1e-7)
    # beta 0.5 on pair 2: margin -2 -> z = -1, loss = log(1 + e) = 1.3132616875
    losses, _, _ = dpo.dpo_loss(pc[1:], pr[1:], rc[1:], rr[1:], beta=0.5)
    assert losses.item() == pytest.approx(1.3132616875, abs=1e-7)


def test_dpo_rewards_are_detached_and_loss_has_gradient():
    pc = torch.tensor([-3.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    losses, cr, rj = dpo.dpo_loss(pc, pr, torch.tensor([-3.5]), torch.tensor([-3.5]), beta=0.1)
    assert not cr.requires_grad and not rj.requires_grad
    losses.sum().backward()
    # d/dpc -log sigmoid(b*m) = -b * (1 - sigmoid(b*m)), m = 1: -0.1 * (1 - sigmoid(0.1)) = -0.0475020813
    assert pc.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(-0.1))), abs=1e-7)
    assert pr.grad.item() == pytest.approx(-pc.grad.item(), abs=1e-7)


def test_dpo_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) * 10 for _ in range(4)]
    args = [a.detach().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda a, b, c, d: dpo.dpo_loss(a, b, c, d, beta=0.3)[0], args)


def test_sequence_logps_equals_manual_loop():
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, 5:] = -100  # padding
    labels[2, :] = -100  # nothing to predict
    logps, ntok = dpo.sequence_logps(logits, labels)
    for b in range(B):
        total, n = 0.0, 0
        for t in range(1, T):  # the token at t is predicted from position t-1
            if labels[b, t] == -100:
                continue
            row = logits[b, t - 1].double()
            total += (row[labels[b, t]] - torch.log(torch.exp(row).sum())).item()
            n += 1
        assert logps[b].item() == pytest.approx(total, abs=1e-4)
        assert ntok[b].item() == n
    assert logps.dtype == torch.float32


def test_sequence_logps_bf16_logits_use_fp32():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 9, 50, generator=g) * 4).bfloat16()
    labels = torch.randint(0, 50, (2, 9), generator=g)
    got, _ = dpo.sequence_logps(logits, labels)
    lp = torch.log_softmax(logits.double(), -1)  # same bf16 values, float64 arithmetic
    ref = lp[:, :-1].gather(-1, labels[:, 1:, None]).squeeze(-1).sum(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=0)


def test_sft_loss_reductions():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 13, generator=g)
    labels = torch.randint(0, 13, (2, 6), generator=g)
    labels[0, :4] = -100  # targets are positions 1..5: sequence 0 has 2 (t = 4, 5), sequence 1 has 5
    lp = torch.log_softmax(logits, -1)
    nll = [-sum(lp[b, t - 1, labels[b, t]].item() for t in range(1, 6) if labels[b, t] != -100) for b in range(2)]
    assert dpo.sft_loss(logits, labels, "sum").item() == pytest.approx((nll[0] + nll[1]) / 2, abs=1e-5)
    assert dpo.sft_loss(logits, labels, "mean").item() == pytest.approx((nll[0] + nll[1]) / 7, abs=1e-5)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1))
    assert dpo.sft_loss(logits, labels, "mean").item() == pytest.approx(ce.item(), abs=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        dpo.sft_loss(logits, labels, "avg")


@pytest.mark.parametrize("chunk,train_w", [(1, True), (3, True), (1024, True), (3, False)])
def test_target_logps_matches_full_logits_and_gradients(chunk, train_w):
    g = torch.Generator().manual_seed(4)
    B, T, C, V = 3, 8, 6, 17
    h = torch.randn(B, T, C, generator=g, requires_grad=True)
    w = torch.randn(V, C, generator=g, requires_grad=train_w)  # frozen head: LoRA
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = -100
    labels[2, 6:] = -100
    coef = torch.randn(B, generator=g)  # an arbitrary downstream use of the per-sequence sums
    got, n1 = dpo.target_logps(h, w, labels, chunk=chunk)
    (got * coef).sum().backward()
    gh, gw = h.grad.clone(), (w.grad.clone() if train_w else None)
    h.grad = w.grad = None
    ref, n2 = dpo.sequence_logps(h @ w.t(), labels)
    (ref * coef).sum().backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert n1.tolist() == n2.tolist()
    torch.testing.assert_close(gh, h.grad, atol=1e-5, rtol=1e-5)
    if train_w:
        torch.testing.assert_close(gw, w.grad, atol=1e-5, rtol=1e-5)
    else:
        assert w.grad is None


def test_chunked_logp_gradcheck():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,), generator=g)
    # the first input's gradient is computed in forward, the second's in backward: both are checked
    assert torch.autograd.gradcheck(lambda a, b: dpo._ChunkedTargetLogp.apply(a, b, y, 2, True), (h, w))


def test_target_logps_under_bf16_autocast_close_to_fp32():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 16, 32, generator=g)
    w = torch.randn(100, 32, generator=g) * 0.2
    labels = torch.randint(0, 100, (2, 16), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = dpo.target_logps(h, w, labels)
    ref, _ = dpo.sequence_logps(h @ w.t(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.5, rtol=0.02)  # bf16 matmul inputs: ~3 significant digits


class _Lin(torch.nn.Module):
    """Minimal causal LM: position t sees tokens <= t through a cumulative mean of embeddings."""

    def __init__(self, V=19, C=8):
        super().__init__()
        self.emb = torch.nn.Embedding(V, C)
        self.lm_head = torch.nn.Linear(C, V, bias=False)

    def forward_hidden(self, ids):
        x = self.emb(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        return torch.tanh(x)

    def forward(self, ids):
        return self.lm_head(self.forward_hidden(ids))


def test_concatenated_forward_equals_two_forwards():
    torch.manual_seed(7)
    m = _Lin()
    batch = {"chosen_input_ids": torch.randint(0, 19, (2, 5)), "rejected_input_ids": torch.randint(0, 19, (2, 8))}
    batch["chosen_labels"] = batch["chosen_input_ids"].clone()
    batch["rejected_labels"] = batch["rejected_input_ids"].clone()
    batch["chosen_labels"][:, :2] = -100
    batch["rejected_labels"][1, 6:] = -100
    c, r = dpo.concatenated_forward(m, batch)
    c_ref, _ = dpo.sequence_logps(m(batch["chosen_input_ids"]), batch["chosen_labels"])
    r_ref, _ = dpo.sequence_logps(m(batch["rejected_input_ids"]), batch["rejected_labels"])
    torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r, r_ref, atol=1e-5, rtol=1e-5)
