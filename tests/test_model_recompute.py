"""Activation checkpointing (model.run_block, `--activations recompute`) changes memory, not numbers: the same
loss and the same gradients as keeping every activation, with dropout on (the recomputation must replay the same
masks) and with LoRA; and a training run gives the same weights. Recomputation is off for a KV-cache forward."""
import pytest
import torch

import dpo
import model as modeling
from conftest import collate_sft, seeded, sft_features, tiny_gpt2, tiny_llama, trained


def loss_and_grads(m, feats, recompute: bool, seed: int):
    m.recompute = recompute
    m.zero_grad(set_to_none=True)
    batch = collate_sft(feats)
    torch.manual_seed(seed)  # the dropout masks
    loss = -dpo.sequence_logps(m(batch["input_ids"]), batch["labels"])[0].sum()
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [False, True])
def test_recomputed_activations_give_the_same_loss_and_gradients(family, lora):
    m = tiny_gpt2(dropout=0.1) if family == "gpt2" else tiny_llama()
    if lora:
        modeling.add_lora(m, r=4, alpha=8, dropout=0.1, seed=3)
        with torch.no_grad():
            for layer in modeling.lora_layers(m).values():
                layer.lora_B.normal_(0, 0.1, generator=seeded(1))
    m.train()  # dropout on: the recomputed forward must draw the same masks
    feats = sft_features(3)
    kept, kept_grads = loss_and_grads(m, feats, False, seed=11)
    again, again_grads = loss_and_grads(m, feats, True, seed=11)
    other, _ = loss_and_grads(m, feats, False, seed=12)
    if family == "gpt2" or lora:
        assert other != kept  # dropout is really on: another seed gives another loss
    torch.testing.assert_close(again, kept, rtol=0, atol=1e-5)
    assert set(again_grads) == set(kept_grads) and kept_grads
    for k in kept_grads:
        torch.testing.assert_close(again_grads[k], kept_grads[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_training_run_with_recomputation_ends_with_the_same_weights(tmp_path):
    out = {}
    for recompute in (False, True):
        cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path / str(recompute)), batch_size=2, max_steps=3, lr=1e-2,
                              warmup_steps=0, recompute=recompute, progress=False, device="cpu")
        dpo.train(tiny_gpt2(dropout=0.1), cfg, sft_features(6), collate_sft, export=False)
        out[recompute] = trained(tmp_path / str(recompute), 3)
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-5, atol=1e-6, msg=k)


def test_recomputation_is_off_for_cached_generation():
    m = tiny_llama().eval()
    m.recompute = True
    prompt = [[5, 6, 7, 8]]
    with torch.enable_grad():  # even with gradients on, a KV-cache forward runs the blocks plainly
        got = modeling.generate(m, prompt, 6, [0])
    m.recompute = False
    assert got == modeling.generate(m, prompt, 6, [0])
