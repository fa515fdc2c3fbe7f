"""LoRA (merged == unmerged, disabled == base, trainable count == formula, adapters round-trip) and save_model
(transformers loads what we write and gives our logits)."""
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import model as M  # noqa: E402

SEED = int(os.environ.get("PAL_TEST_SEED", random.SystemRandom().randrange(2**31)))
print(f"[test_model_lora_save] seed {SEED} (rerun with PAL_TEST_SEED={SEED})")

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32},
             tie_word_embeddings=True, model_type="llama")
GPT2 = dict(vocab_size=120, n_positions=64, n_embd=48, n_layer=2, n_head=4, model_type="gpt2")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spin-waiting when other test processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fresh(family, **over):
    torch.manual_seed(SEED)
    cfg = M.config_from_hf({**(LLAMA if family == "llama" else GPT2), **over})
    m = M.build_model(cfg).eval()
    with torch.no_grad():   # RMSNorm / LayerNorm weights start at 1: make them random too
        for name, p in m.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def ids_for(m, B=2, T=10):
    return torch.randint(0, m.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(SEED + 1))


def randomize_lora_B(m):
    with torch.no_grad():
        for layer in M.lora_layers(m).values():
            layer.lora_B.normal_(0, 0.05)


# ---------------------------------------------------------------------------------------------- LoRA

def expected_lora_params(family, cfg, r, targets):
    """Trainable LoRA parameters from the config alone: r * (in + out) per wrapped matrix per layer."""
    if family == "llama":
        C, I, H, Hkv, D = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                           cfg.num_key_value_heads, cfg.head_dim)
        shapes = {"q": [(C, H * D)], "k": [(C, Hkv * D)], "v": [(C, Hkv * D)], "o": [(H * D, C)],
                  "mlp": [(C, I), (C, I), (I, C)]}
        L = cfg.num_hidden_layers
    else:
        C = cfg.n_embd
        shapes = {"qkv": [(C, 3 * C)], "o": [(C, C)], "mlp": [(C, 4 * C), (4 * C, C)]}
        targets = {"qkv" if t in "qkv" else t for t in targets}
        L = cfg.n_layer
    return L * sum(r * (i + o) for t in targets for i, o in shapes[t])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "mlp"), ("q", "v")])
def test_lora_trainable_count_and_identity_at_start(family, targets):
    m = fresh(family)
    ids = ids_for(m)
    with torch.no_grad():
        base = m(ids)
    wrapped = M.add_lora(m, r=4, alpha=8, targets=targets)
    assert wrapped and all(isinstance(m.get_submodule(n), M.LoRALinear) for n in wrapped)
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert all(n.endswith(("lora_A", "lora_B")) for n, _ in trainable)
    assert sum(p.numel() for _, p in trainable) == expected_lora_params(family, m.config, 4, targets)
    with torch.no_grad():
        torch.testing.assert_close(m(ids), base, rtol=0, atol=0)   # B = 0: identical at the start


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_merged_equals_unmerged_and_disabled_equals_base(family):
    m = fresh(family)
    ids = ids_for(m)
    with torch.no_grad():
        base = m(ids)
    emb = (m.embed if family == "llama" else m.wte).weight.clone()
    M.add_lora(m, r=4, alpha=8, dropout=0.1)
    randomize_lora_B(m)
    m.eval()
    assert not any(layer.merged for layer in M.lora_layers(m).values()), ".eval() must not merge"
    with torch.no_grad():
        adapted = m(ids)
        assert (adapted - base).abs().max() > 1e-3         # the adapters really change the output
        with M.lora_disabled(m):
            torch.testing.assert_close(m(ids), base, rtol=0, atol=1e-6)
        M.merge_lora(m)
        torch.testing.assert_close(m(ids), adapted, rtol=0, atol=1e-5)
        with pytest.raises(RuntimeError, match="unmerge"):
            with M.lora_disabled(m):
                pass
        M.unmerge_lora(m)
        torch.testing.assert_close(m(ids), adapted, rtol=0, atol=1e-5)
    # the tied output projection is still the (unchanged, frozen) embedding
    emb_now = (m.embed if family == "llama" else m.wte).weight
    assert torch.equal(emb_now, emb) and not emb_now.requires_grad


def test_lora_gradients_reach_only_adapters():
    m = fresh("llama")
    M.add_lora(m, r=2, alpha=4)
    randomize_lora_B(m)
    m.train()
    logits = m(ids_for(m))
    logits.float().logsumexp(-1).mean().backward()
    for n, p in m.named_parameters():
        if n.endswith(("lora_A", "lora_B")):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_lora_save_load_round_trip(tmp_path):
    m = fresh("llama")
    M.add_lora(m, r=4, alpha=8)
    randomize_lora_B(m)
    ids = ids_for(m)
    with torch.no_grad():
        want = m(ids)
    M.save_lora(m, tmp_path / "adapter.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    other = fresh("llama")
    M.add_lora(other, r=4, alpha=8)    # different random A, zero B
    M.load_lora(other, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(other(ids), want, rtol=0, atol=0)
    wrong = fresh("llama")
    M.add_lora(wrong, r=2, alpha=8)
    with pytest.raises(M.CheckpointError, match="lora_A"):
        M.load_lora(wrong, tmp_path / "adapter.safetensors")


# ---------------------------------------------------------------------------------------------- save_model

@pytest.mark.parametrize("family,over", [("llama", {}), ("llama", dict(tie_word_embeddings=False, attention_bias=True)),
                                         ("gpt2", {})])
def test_save_model_loads_in_transformers(tmp_path, family, over):
    m = fresh(family, **over)
    ids = ids_for(m)
    M.save_model(m, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == ("LlamaForCausalLM" if family == "llama" else "GPT2LMHeadModel")
    with torch.no_grad():
        err = (m(ids) - ref(ids).logits).abs().max().item()
    assert err < 1e-5, err
    again = M.load_model(tmp_path)           # and our own loader reads it back exactly
    with torch.no_grad():
        torch.testing.assert_close(again(ids), m(ids), rtol=0, atol=0)


def test_save_model_with_lora_writes_merged_weights(tmp_path):
    m = fresh("gpt2")
    M.add_lora(m, r=4, alpha=8)
    randomize_lora_B(m)
    ids = ids_for(m)
    with torch.no_grad():
        want = m(ids)
    M.save_model(m, tmp_path)
    assert not any(layer.merged for layer in M.lora_layers(m).values())   # saving does not mutate the model
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        err = (ref(ids).logits - want).abs().max().item()
    assert err < 1e-5, err


def test_save_model_bf16(tmp_path):
    m = fresh("llama").to(torch.bfloat16)
    M.save_model(m, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert ref.dtype == torch.bfloat16
    sd_ours = M.hf_state_dict(m)
    for k, v in ref.state_dict().items():
        if k in sd_ours:
            assert torch.equal(v, sd_ours[k]), k
