"""model.py against transformers (the oracle) on tiny random checkpoints saved in the official layout.

Every run draws a fresh seed (printed, and reproducible with PAL_TEST_SEED=...), so the checks are not tuned
to one lucky set of weights.
"""
import json
import os
import random
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import model as M  # noqa: E402

SEED = int(os.environ.get("PAL_TEST_SEED", random.SystemRandom().randrange(2**31)))
print(f"[test_model] seed {SEED} (rerun with PAL_TEST_SEED={SEED})")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spin-waiting when other test processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def seeded(offset=0):
    torch.manual_seed(SEED + offset)
    return torch.Generator().manual_seed(SEED + offset)


# ---------------------------------------------------------------------------------------------- tiny checkpoints

LLAMA_BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


def hf_llama(path, offset=0, **over):
    """A random transformers Llama saved with save_pretrained (safetensors) into `path`; returns the HF model."""
    kw = {**LLAMA_BASE, **over}
    seeded(offset)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    m.save_pretrained(path)
    return m


def hf_gpt2(path, offset=0, **over):
    kw = dict(vocab_size=150, n_positions=128, n_embd=48, n_layer=2, n_head=4, initializer_range=0.1, **over)
    seeded(offset)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()
    m.save_pretrained(path)
    return m


def random_ids(V, B, T, offset=0):
    return torch.randint(0, V, (B, T), generator=seeded(1000 + offset))


def assert_logits_match(ours, theirs, ids, **kw):
    with torch.no_grad():
        a = ours(ids, **kw)
        b = theirs(ids, **kw).logits
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err < 1e-5, f"max |ours - transformers| = {err}"


# ---------------------------------------------------------------------------------------------- logits vs transformers

@pytest.mark.parametrize("variant", ["gqa_untied", "gqa_tied_llama3", "mha_bias"])
def test_llama_logits_match_transformers(tmp_path, variant):
    over = {"gqa_untied": dict(num_key_value_heads=2),
            "gqa_tied_llama3": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
                                    rope_scaling=LLAMA3_SCALING),
            "mha_bias": dict(attention_bias=True, head_dim=32)}[variant]
    ref = hf_llama(tmp_path, **over)
    ours = M.load_model(tmp_path)
    assert ours.family == "llama" and (ours.lm_head is None) == over.get("tie_word_embeddings", False)
    assert_logits_match(ours, ref, random_ids(160, 3, 40))


def test_llama3_rope_scaling_changes_frequencies():
    """The scaled frequencies equal transformers' own rope init, and differ from the unscaled ones (test can fail)."""
    kw = {**LLAMA_BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = transformers.LlamaConfig(**kw)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    cfg = M.LlamaConfig.from_hf(hf_cfg.to_dict())
    ours = M.rope_inv_freq(cfg)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    plain = M.rope_inv_freq(M.LlamaConfig.from_hf({**hf_cfg.to_dict(), "rope_parameters": {"rope_theta": 500000.0}}))
    assert not torch.allclose(ours, plain)


def test_llama_sharded_checkpoint(tmp_path):
    seeded()
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_BASE, "num_key_value_heads": 2})).eval()
    ref.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_logits_match(M.load_model(tmp_path), ref, random_ids(160, 2, 20))


@pytest.mark.parametrize("prefix", [True, False])
def test_gpt2_logits_match_transformers(tmp_path, prefix):
    ref = hf_gpt2(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    assert any(k.startswith("transformer.") for k in sd)
    if not prefix:   # older GPT-2 checkpoints: bare keys, plus the causal-mask buffers that must be ignored
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        sd["h.1.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(sd, f, metadata={"format": "pt"})
    ours = M.load_model(tmp_path)
    assert ours.family == "gpt2"
    assert_logits_match(ours, ref, random_ids(150, 3, 30))


def test_gpt2_chinese_config():
    from conftest import shared_file
    hf = json.loads(shared_file("tokenizers/gpt2-chinese/config.json").read_text())
    cfg = M.GPT2Config.from_hf(hf)
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (21128, 12, 768, 12, 1024)
    assert M.GPT2Config.from_hf(cfg.to_hf()) == cfg


def test_llama_config_round_trip_and_hf_readable():
    cfg = M.LlamaConfig.from_hf({**LLAMA_BASE, "num_key_value_heads": 2, "rope_theta": 500000.0,
                                 "rope_scaling": {**LLAMA3_SCALING}, "model_type": "llama"})
    assert M.LlamaConfig.from_hf(cfg.to_hf()) == cfg
    hf = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})
    assert hf.num_key_value_heads == 2 and hf.rope_parameters["rope_type"] == "llama3"
    assert hf.rope_parameters["rope_theta"] == 500000.0


# ---------------------------------------------------------------------------------------------- padding and masks

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_matches_transformers(tmp_path, family):
    ref = hf_llama(tmp_path, num_key_value_heads=2) if family == "llama" else hf_gpt2(tmp_path)
    ours = M.load_model(tmp_path)
    ids = random_ids(ref.config.vocab_size, 4, 12)
    mask = torch.ones_like(ids)
    for b, n_pad in enumerate([0, 3, 7, 11]):
        mask[b, :n_pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=pos)
        b = ref(ids, attention_mask=mask, position_ids=pos).logits
    assert torch.isfinite(a).all(), "a fully masked (padding) row became NaN/inf"
    valid = mask.bool()
    err = (a[valid] - b[valid]).abs().max().item()
    assert err < 1e-5, err


def test_fully_masked_rows_are_finite_in_bf16(tmp_path):
    hf_llama(tmp_path, num_key_value_heads=2)
    ours = M.load_model(tmp_path, dtype=torch.bfloat16)
    ids = random_ids(160, 2, 6)
    mask = torch.tensor([[0, 0, 0, 0, 1, 1], [1] * 6])
    assert ours.embed.weight.dtype == torch.bfloat16
    assert torch.isfinite(ours(ids, attention_mask=mask).float()).all()


# ---------------------------------------------------------------------------------------------- generation

def uncached_greedy(model, prompt, n, stop_ids):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([seq]))[0, -1].argmax())
            if tok in stop_ids:
                break
            seq.append(tok)
    return seq[len(prompt):]


def prompts_of(V, lengths, offset=0):
    g = seeded(2000 + offset)
    return [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_matches_transformers_and_uncached(tmp_path, family):
    ref = hf_llama(tmp_path, num_key_value_heads=2) if family == "llama" else hf_gpt2(tmp_path)
    ours = M.load_model(tmp_path)
    V = ref.config.vocab_size
    prompts = prompts_of(V, [5, 11, 1])
    free = M.generate(ours, prompts, 12, stop_ids=[])
    assert [len(r) for r in free] == [12, 12, 12]
    stop = free[0][4]                       # a token row 0 really produces: it must stop there
    got = M.generate(ours, prompts, 12, stop_ids=[stop, V + 5])
    assert got[0] == free[0][:free[0].index(stop)]
    for p, row in zip(prompts, got):
        assert row == uncached_greedy(ours, p, 12, {stop})
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=0)
        hf_new = hf[0, len(p):].tolist()
        if stop in hf_new:
            hf_new = hf_new[:hf_new.index(stop)]
        assert row == hf_new


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_padded_batch_of_8_equals_one_at_a_time(tmp_path, family):
    ref = hf_llama(tmp_path, num_key_value_heads=1) if family == "llama" else hf_gpt2(tmp_path)
    del ref
    ours = M.load_model(tmp_path)
    prompts = prompts_of(ours.config.vocab_size, [1, 3, 17, 8, 2, 30, 5, 12], offset=1)
    singles = [M.generate(ours, [p], 16, stop_ids=[]) [0] for p in prompts]
    stop = singles[2][5]
    singles = [M.generate(ours, [p], 16, stop_ids=[stop])[0] for p in prompts]
    batch = M.generate(ours, prompts, 16, stop_ids=[stop])
    assert batch == singles
    assert len(batch[2]) == singles[2].__len__() <= 5


def test_generate_edge_cases(tmp_path):
    hf_llama(tmp_path)
    ours = M.load_model(tmp_path)
    assert M.generate(ours, [[5, 6]], 0, stop_ids=[2]) == [[]]
    assert M.generate(ours, [], 4, stop_ids=[2]) == []
    with pytest.raises(ValueError, match="at least one token"):
        M.generate(ours, [[]], 4, stop_ids=[2])


# ---------------------------------------------------------------------------------------------- bad checkpoints

@pytest.fixture
def llama_dir(tmp_path):
    hf_llama(tmp_path, num_key_value_heads=2)
    return tmp_path


def _edit_checkpoint(d, fn):
    f = d / "model.safetensors"
    sd = dict(load_file(f))
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_missing_key_is_named(llama_dir):
    _edit_checkpoint(llama_dir, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(M.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(96, 64\)"):
        M.load_model(llama_dir)


def test_extra_key_is_named(llama_dir):
    _edit_checkpoint(llama_dir, lambda sd: sd.__setitem__("model.layers.0.mystery.weight", torch.zeros(3, 4)))
    with pytest.raises(M.CheckpointError, match=r"unexpected key 'model\.layers\.0\.mystery\.weight'.*\(3, 4\)"):
        M.load_model(llama_dir)


def test_wrong_shape_names_both_shapes(llama_dir):
    _edit_checkpoint(llama_dir, lambda sd: sd.__setitem__("model.layers.0.self_attn.k_proj.weight",
                                                          torch.zeros(64, 64)))
    with pytest.raises(M.CheckpointError, match=r"k_proj\.weight' has shape \(64, 64\).*needs \(32, 64\)"):
        M.load_model(llama_dir)


# ------------------------------------------------------------------------------ names, hub cache, dtypes

def test_hub_id_from_local_cache_without_network(tmp_path, monkeypatch, llama_dir):
    ref = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--tester--tiny-llama"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(llama_dir / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("load_model tried to open a network socket")
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert M.resolve_model_dir("tester/tiny-llama") == snap
    assert_logits_match(M.load_model("tester/tiny-llama"), ref, random_ids(160, 1, 9))


def test_unknown_name_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="unknown model 'no-such-model-xyz'"):
        M.load_model("no-such-model-xyz")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        M.load_model(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_model(tmp_path)   # a directory, but no checkpoint in it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_half_precision(llama_dir, dtype):
    ref = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    ours = M.load_model(llama_dir, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    assert not any(p.is_meta for p in ours.parameters())
    ids = random_ids(160, 2, 16)
    with torch.no_grad():
        err = (ours(ids).float() - ref(ids).logits).abs().max().item()
    assert err < 0.1, err


def test_generate_respects_gpt2_context_and_int_stop(tmp_path):
    hf_gpt2(tmp_path)                      # n_positions = 128
    ours = M.load_model(tmp_path)
    prompt = prompts_of(150, [100])[0]
    with pytest.raises(ValueError, match="n_positions=128"):
        M.generate(ours, [prompt], 30, stop_ids=None)
    free = M.generate(ours, [prompt], 29, stop_ids=None)[0]   # positions 0..127: exactly fits
    assert len(free) == 29
    assert M.generate(ours, [prompt], 29, stop_ids=free[3])[0] == free[:free.index(free[3])]
