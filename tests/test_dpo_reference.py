"""The DPO reference of a LoRA policy is its base, with the adapters switched off (issue 25: the cached reference
was only ever taken while B was still zero, so a reference computed with the adapters on passed every test).
Here the adapters are non-zero from the start, and the base's log-probs are written out by hand."""
import pytest
import torch
import torch.nn.functional as F

import dpo
import model as modeling
from conftest import collate_dpo, dpo_features, log_records, seeded, tiny_llama

BETA = 0.5


def lora_policy():
    """tiny_llama() with LoRA on every target, B drawn non-zero: the policy differs from its base."""
    policy = tiny_llama()
    modeling.add_lora(policy, r=4, alpha=8, seed=1)
    g = seeded(3)
    with torch.no_grad():
        for layer in modeling.lora_layers(policy).values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=g))
    return policy


def hand_logps(model, feats: list[dict]) -> torch.Tensor:
    """(N, 2): summed log-probs of each pair's chosen and rejected targets, one sequence at a time."""
    out = torch.zeros(len(feats), 2)
    with torch.no_grad():
        for i, f in enumerate(feats):
            for j, half in enumerate(("chosen", "rejected")):
                ids, labels = torch.tensor(f[f"{half}_input_ids"]), torch.tensor(f[f"{half}_labels"])
                logits = model(ids[None])[0, :-1].float()
                out[i, j] = -F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
    return out


@pytest.mark.parametrize("chunked", [False, True])
def test_reference_logps_are_the_base_models(chunked):
    feats = dpo_features(6)
    policy = lora_policy().eval()
    base = hand_logps(tiny_llama().eval(), feats)
    assert (hand_logps(policy, feats) - base).abs().max() > 0.1  # the adapters change the log-probs
    c, r = dpo.reference_logps(None, policy, collate_dpo(feats), chunked)
    torch.testing.assert_close(torch.stack([c, r], 1), base, atol=1e-4, rtol=1e-5)


def test_cached_reference_is_the_base_models(tmp_path):
    feats = dpo_features(6)
    got = dpo.cached_reference_logps(lora_policy(), None, feats, collate_dpo, tmp_path / "ref.safetensors",
                                     batch_size=4)
    torch.testing.assert_close(got, hand_logps(tiny_llama().eval(), feats), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("reference", ["cache", "live"])
def test_first_step_rewards_are_policy_minus_base(tmp_path, reference):
    """The logged rewards of step 1 (computed before the update): beta * (policy - base), averaged over pairs."""
    feats = dpo_features(4)
    policy = lora_policy()
    expected = BETA * (hand_logps(policy.eval(), feats) - hand_logps(tiny_llama().eval(), feats)).mean(0)
    cfg = dpo.TrainConfig(mode="dpo", out_dir=str(tmp_path), batch_size=4, max_steps=1, lr=1e-3, warmup_steps=0,
                          beta=BETA, reference=reference, progress=False, device="cpu")
    dpo.train(policy, cfg, feats, collate_dpo, export=False)
    (rec,) = [r for r in log_records(tmp_path) if "loss" in r]
    assert [rec["chosen_reward"], rec["rejected_reward"]] == pytest.approx(expected.tolist(), abs=1e-4)
