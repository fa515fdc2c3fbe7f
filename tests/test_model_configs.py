"""Configs of the real checkpoints the project names (written here from their published config.json files):
our model built on the meta device has exactly the parameters, names and shapes of transformers' model."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import model as M  # noqa: E402

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
        from conftest import shared_file
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
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA31_8B.items() if k != "model_type"})
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert scale == 1.0
    torch.testing.assert_close(M.rope_inv_freq(M.config_from_hf(LLAMA31_8B)), ref.float(), rtol=1e-6, atol=0)


def test_half_precision_linear_fast_path_rounds_like_the_plain_kernel():
    """The fp32 path for half-precision inference differs from PyTorch's bf16 kernel only by summation order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g).bfloat16()
    w = torch.randn(9000, 64, generator=g).bfloat16()      # > 4096 rows: the blockwise path
    b = torch.randn(9000, generator=g).bfloat16()
    with torch.inference_mode():
        fast = M.linear(x, w, b)
        plain = torch.nn.functional.linear(x, w, b)
    exact = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert fast.dtype == torch.bfloat16 and fast.shape == plain.shape
    # both are within bf16 rounding of the exact product
    tol = 2 ** -7 * exact.abs() + 1e-2
    assert ((fast.double() - exact).abs() <= tol).all() and ((plain.double() - exact).abs() <= tol).all()
