"""extras/fast_cpu.py: the fp32-block path for half-precision CPU inference computes what F.linear computes, up to
summation order, and `enable(model)` changes no result beyond that."""
import pytest
import torch
import torch.nn.functional as F

import model as M
from extras import fast_cpu

TINY_LLAMA = dict(model_type="llama", vocab_size=9000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def test_half_precision_linear_fast_path_rounds_like_the_plain_kernel():
    """The fp32 path for half-precision inference differs from PyTorch's bf16 kernel only by summation order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g).bfloat16()
    w = torch.randn(9000, 64, generator=g).bfloat16()      # > 4096 rows: the blockwise path
    b = torch.randn(9000, generator=g).bfloat16()
    with torch.inference_mode():
        fast = fast_cpu.linear(x, w, b)
        plain = F.linear(x, w, b)
    exact = F.linear(x.double(), w.double(), b.double())
    assert fast.dtype == torch.bfloat16 and fast.shape == plain.shape
    # both are within bf16 rounding of the exact product
    tol = 2 ** -7 * exact.abs() + 1e-2
    assert ((fast.double() - exact).abs() <= tol).all() and ((plain.double() - exact).abs() <= tol).all()


def test_plain_path_where_the_half_precision_kernel_is_the_right_one():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 64, generator=g).bfloat16()
    one_row = torch.randn(1, 3, 64, generator=g).bfloat16()               # a decode step: 3 rows < 4
    with torch.inference_mode():
        assert torch.equal(fast_cpu.linear(one_row, w), F.linear(one_row, w))
    x = torch.randn(16, 64, generator=g).bfloat16()
    assert torch.equal(fast_cpu.linear(x, w), F.linear(x, w))              # grad enabled: training
    xf, wf = x.float(), w.float()
    with torch.inference_mode():
        assert torch.equal(fast_cpu.linear(xf, wf), F.linear(xf, wf))      # fp32 weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_enable_keeps_logits_and_hidden_states(dtype):
    torch.manual_seed(0)
    model = M.build_model(M.config_from_hf(TINY_LLAMA)).to(dtype).eval()
    ids = torch.randint(0, 9000, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        plain_logits, plain_hidden = model(ids), model(ids, hidden_only=True)
        fast_cpu.enable(model)
        assert fast_cpu.enable(model) is model                             # enabling twice changes nothing more
        fast_logits, fast_hidden = model(ids), model(ids, hidden_only=True)
    assert fast_logits.dtype == dtype and fast_logits.shape == plain_logits.shape == (2, 12, 9000)
    assert fast_hidden.shape == plain_hidden.shape == (2, 12, 64)
    assert model.fast_cpu and model.layers[0].mlp.up.forward.func is fast_cpu._fast_linear_forward
    # same weights, only the summation order differs: within two roundings of the largest value
    for fast, plain in ((fast_logits, plain_logits), (fast_hidden, plain_hidden)):
        tol = 2 * torch.finfo(dtype).eps * plain.float().abs().max()
        assert (fast.float() - plain.float()).abs().max() <= tol
    out = M.generate(model, [[5, 6, 7, 8, 9], [3]], 4, stop_ids=[])        # the cache path still works
    assert [len(r) for r in out] == [4, 4]
