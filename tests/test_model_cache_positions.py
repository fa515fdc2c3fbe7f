"""A forward through the KV cache without explicit position ids continues the positions where the cache stopped,
as transformers does (found by tests/mutations.py: generate() always passes positions, so positions restarting at 0
after a cached prefix passed every other test). Checked against transformers' own cached forward."""
import pytest
import torch

import model as modeling
from conftest import hf_gpt2, hf_llama, seeded


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_chunks_without_positions_equal_transformers(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    hf = (hf_llama if family == "llama" else hf_gpt2)(tmp_path)
    ours = modeling.load_model(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=seeded(5))
    cache = ours.new_cache(2, 16)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits  # one pass, positions 0..11
        hf_cache = transformers.DynamicCache()
        hf_chunks = [hf(input_ids=ids[:, a:b], past_key_values=hf_cache, use_cache=True).logits
                     for a, b in ((0, 7), (7, 8), (8, 12))]
        got = [ours(ids[:, a:b], cache=cache) for a, b in ((0, 7), (7, 8), (8, 12))]  # prefill, one token, three
    torch.testing.assert_close(torch.cat(hf_chunks, 1), expected, atol=1e-4, rtol=1e-4)  # the oracle agrees
    torch.testing.assert_close(torch.cat(got, 1), expected, atol=1e-4, rtol=1e-4)
