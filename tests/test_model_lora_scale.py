"""The LoRA update against its definition and against PEFT (issue 25: every other LoRA test takes `layer.scale` as
the truth, so an inverted scale, r / alpha, passed them all; merge and export agree with whatever scale is used)."""
import pytest
import torch
from torch import nn

import model as modeling
from conftest import SEED, hf_llama, seeded


@pytest.mark.parametrize("r,alpha", [(8, 16), (4, 32), (16, 8)])
def test_lora_linear_is_w_x_plus_alpha_over_r_b_a_x(r, alpha):
    """W x + b + (alpha / r) B A x, written out with plain matrix products, for A and B both non-zero."""
    g = seeded()
    base = nn.Linear(24, 40)
    layer = modeling.LoRALinear(base, r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(r, 24, generator=g))
        layer.lora_B.copy_(torch.randn(40, r, generator=g))
    x = torch.randn(3, 5, 24, generator=g)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    a_, b_ = layer.lora_A.detach(), layer.lora_B.detach()
    expected = x @ w.T + b + (alpha / r) * (x @ a_.T @ b_.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.merge()  # and the merged weight is the same W + (alpha / r) B A
    torch.testing.assert_close(base.weight, w + (alpha / r) * b_ @ a_, atol=1e-5, rtol=1e-5)


def test_lora_llama_logits_equal_peft(tmp_path):
    """Our LoRA on q and v of a Llama (r 4, alpha 32: alpha / r = 8, r / alpha = 1/8) against PEFT's on the same
    weights, both adapters non-zero."""
    peft = pytest.importorskip("peft")
    r, alpha = 4, 32
    hf = hf_llama(tmp_path)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)  # PEFT's random init for A and B (B is not zero)
    torch.manual_seed(SEED + 7)
    ref = peft.get_peft_model(hf, cfg).eval()
    ours = modeling.load_model(tmp_path)
    modeling.add_lora(ours, r=r, alpha=alpha, targets=("q", "v"))
    layers = modeling.lora_layers(ours)
    copied = 0
    for name, p in ref.named_parameters():
        if "lora_" not in name:
            continue
        # base_model.model.model.layers.{i}.self_attn.{q,v}_proj.lora_{A,B}.default.weight -> layers.{i}.attn.{q,v}
        i = int(name.split(".layers.")[1].split(".")[0])
        proj = "q" if ".q_proj." in name else "v"
        mat = "lora_A" if ".lora_A." in name else "lora_B"
        with torch.no_grad():
            getattr(layers[f"layers.{i}.attn.{proj}"], mat).copy_(p)
        copied += 1
    assert copied == 2 * 2 * hf.config.num_hidden_layers == 2 * len(layers)
    ids = torch.randint(0, hf.config.vocab_size, (2, 9), generator=seeded(1))
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = ours(ids)
        with ref.disable_adapter():
            plain = ref(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the adapters matter: the comparison is not between two bases
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
