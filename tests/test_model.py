"""model.py against transformers (the oracle): tiny random checkpoints saved in the official layout (logits,
padding, generation, bad checkpoints, hub cache), the configs of the real checkpoints the project names, LoRA
(merged == unmerged, disabled == base, trainable count == formula, adapters round-trip) and save_model
(transformers loads what we write and gives our logits).

Every run draws a fresh seed (printed, and reproducible with PAL_TEST_SEED=...), so the checks are not tuned
to one lucky set of weights.
"""
import json
import os
import re
import shutil
import socket

import pytest
import torch
from conftest import LLAMA_BASE, SEED, hf_gpt2, hf_llama, seeded, shared_file, tiny_llama
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

import model as M  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
# SEED (drawn per run, printed, PAL_TEST_SEED=... repeats it), seeded, LLAMA_BASE, hf_llama, hf_gpt2: conftest.py


# ---------------------------------------------------------------------------------------------- tiny checkpoints

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}


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


def test_a_shard_path_outside_the_model_directory_is_refused(tmp_path):
    """issue 23: a weight_map naming "../elsewhere.safetensors" was read from outside the model directory."""
    seeded()
    model_dir = tmp_path / "model"
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_BASE))
    hf.save_pretrained(model_dir, max_shard_size="30KB")
    index = model_dir / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    first = sorted(set(meta["weight_map"].values()))[0]
    os.replace(model_dir / first, tmp_path / first)  # the shard now lies next to the directory, not in it
    meta["weight_map"] = {k: f"../{v}" if v == first else v for k, v in meta["weight_map"].items()}
    index.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{index}: shard names must be files in {model_dir}")):
        M.load_model(model_dir)


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


def test_truncated_checkpoint_is_a_clear_error(llama_dir):
    f = llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])                    # a download cut short
    with pytest.raises(M.CheckpointError, match=r"model\.safetensors: not a complete safetensors file"):
        M.load_model(llama_dir)


def test_hidden_only_times_output_weight_is_the_logits(tmp_path):
    for family, make in (("llama", lambda p: hf_llama(p, tie_word_embeddings=False)), ("gpt2", hf_gpt2)):
        make(tmp_path / family)
        ours = M.load_model(tmp_path / family)
        ids = random_ids(ours.config.vocab_size, 2, 7)
        with torch.no_grad():
            hidden = ours(ids, hidden_only=True)
            assert hidden.shape == (2, 7, ours.output_weight.shape[1])
            torch.testing.assert_close(hidden @ ours.output_weight.T, ours(ids), rtol=0, atol=1e-5)
            torch.testing.assert_close(ours(ids, last_only=True, hidden_only=True), hidden[:, -1:], rtol=0, atol=0)
    assert ours.output_weight is ours.wte.weight


def test_atomic_path_replaces_files_and_directories_or_leaves_nothing(tmp_path):
    M.write_json(tmp_path / "a.json", {"x": "é"})
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == '{\n  "x": "é"\n}\n'
    for text in ("old", "new"):                              # a directory replaced as a whole
        with M.atomic_path(tmp_path / "d") as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(text)
    assert (tmp_path / "d" / "f").read_text() == "new"
    with pytest.raises(RuntimeError):
        with M.atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]   # no temporary left, old file kept
    assert "é" in (tmp_path / "a.json").read_text(encoding="utf-8")


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


# ---------------------------------------------------------------------------------------------- configs of real checkpoints
# (written here from their published config.json files): our model built on the meta device has exactly
# the parameters, names and shapes of transformers' model.

LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                  rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
                  eos_token_id=[128001, 128008, 128009],
                  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"})
LLAMA32_1B = dict(LLAMA31_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                  tie_word_embeddings=True, rope_scaling={**LLAMA31_8B["rope_scaling"], "factor": 32.0})
LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, rope_scaling=None, tie_word_embeddings=False, pretraining_tp=1)
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
GPT2_SMALL = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
DIALOGPT_MEDIUM = dict(GPT2_SMALL, n_ctx=1024, n_embd=1024, n_layer=24, n_head=16)

CONFIGS = {"llama3.1-8b": LLAMA31_8B, "llama3.2-1b": LLAMA32_1B, "llama2-7b": LLAMA2_7B,
           "smollm2-135m": SMOLLM2_135M, "gpt2": GPT2_SMALL, "dialogpt-medium": DIALOGPT_MEDIUM,
           "gpt2-chinese": None}


def hf_model_on_meta(hf: dict):
    cfg = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_real_configs_build_the_same_parameters(name):
    hf = CONFIGS[name]
    if hf is None:
        hf = json.loads(shared_file("tokenizers/gpt2-chinese/config.json").read_text())
    cfg = M.config_from_hf(hf)
    assert type(cfg).from_hf(cfg.to_hf()) == cfg
    with torch.device("meta"):
        ours = M.build_model(cfg)
    ref = hf_model_on_meta(hf)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for name_, p in ours.state_dict().items():
        key = M.hf_name(ours, name_)
        want = ref_shapes[key]
        if M.is_transposed(ours, name_):
            want = want[::-1]
        assert tuple(p.shape) == want, (name_, key)


def test_llama31_rope_frequencies_match_transformers():
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA31_8B.items() if k != "model_type"})
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert scale == 1.0
    torch.testing.assert_close(M.rope_inv_freq(M.config_from_hf(LLAMA31_8B)), ref.float(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------- LoRA

LORA_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0,
             rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32},
             tie_word_embeddings=True, model_type="llama")
LORA_GPT2 = dict(vocab_size=120, n_positions=64, n_embd=48, n_layer=2, n_head=4, model_type="gpt2")


def fresh(family, **over):
    torch.manual_seed(SEED)
    cfg = M.config_from_hf({**(LORA_LLAMA if family == "llama" else LORA_GPT2), **over})
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


def adapted(family):
    """A fresh model with r=4 adapters whose B is random (so they change the output), input ids, and its logits."""
    m = fresh(family)
    M.add_lora(m, r=4, alpha=8)
    randomize_lora_B(m)
    ids = ids_for(m)
    with torch.no_grad():
        return m, ids, m(ids)


def test_lora_save_load_round_trip(tmp_path):
    m, ids, want = adapted("llama")
    M.save_lora(m, tmp_path / "adapter.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]   # atomic: no temporary left
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
    m, ids, want = adapted("gpt2")
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


def test_lora_initialisation_follows_its_seed_whatever_ran_before():
    """add_lora(seed=s) draws every A from its own generator: the same seed gives the same adapters after any use of
    the global random stream (two runs of one command are identical), another seed other adapters; the global
    stream is left as it was."""
    def adapters(seed, burn):
        torch.manual_seed(burn)
        torch.rand(burn)  # whatever ran before: model loading, data shuffling
        m = tiny_llama()
        state = torch.get_rng_state()
        M.add_lora(m, r=4, alpha=8, seed=seed)
        assert torch.equal(torch.get_rng_state(), state)
        return {k: v.clone() for k, v in M.lora_state_dict(m).items()}

    a, again, other = adapters(7, 1), adapters(7, 123), adapters(8, 1)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert all(not torch.equal(a[k], other[k]) for k in a if k.endswith("lora_A"))
