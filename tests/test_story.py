"""The story, for a doubting reader: a GPT-2 that transformers builds and saves is one that our code loads and
runs the same way. Same logits on real text, the same 20 greedy tokens, the same words when decoded.

transformers is the oracle throughout: it draws the weights, writes the checkpoint (the official Hugging Face
layout, Conv1D weights and all), encodes the prompt and decodes its own reply. Our side only reads files."""
import shutil

import pytest
import torch
from conftest import shared_file

transformers = pytest.importorskip("transformers")

import data  # noqa: E402
import model as modeling  # noqa: E402

TEXT = ["My dog is named Biscuit and he loves the sea.", "I work night shifts at a bakery in a small town."]


def test_a_transformers_gpt2_loads_runs_and_speaks_the_same_in_our_code(tmp_path):
    # 1. transformers draws a small random GPT-2 over the real vocabulary and saves it as the hub would hold it.
    #    The weights are drawn wider than GPT-2's 0.02 so that the tokens a greedy decoder picks are not near-ties.
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                  initializer_range=0.2)
    theirs = transformers.GPT2LMHeadModel(cfg).eval()
    theirs.save_pretrained(tmp_path)
    # ... next to GPT-2's real BPE files, under the names the hub gives them
    bpe = shared_file("tokenizers/gpt2/encoder.json").parent
    shutil.copy(bpe / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(bpe / "vocab.bpe", tmp_path / "merges.txt")

    # 2. Our loader reads the directory; our tokenizer reads OpenAI's original files. Both agree with transformers'
    #    tokenizer on real text before any model runs.
    ours = modeling.load_model(tmp_path)
    tok = data.load_tokenizer(bpe)
    oracle = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    ids = [oracle(t)["input_ids"] for t in TEXT]
    assert [tok.encode(t) for t in TEXT] == ids

    # 3. The same real-text batch gives the same logits (fp32). A Conv1D weight loaded untransposed, a lost
    #    position embedding or a wrong layer norm would each move them by far more than 1e-4.
    n = min(map(len, ids))
    batch = torch.tensor([row[:n] for row in ids])
    with torch.no_grad():
        got, want = ours(batch), theirs(batch).logits
    assert got.shape == want.shape == (2, n, 50257)
    assert want.std() > 0.1  # logits that differ between tokens, so that agreeing means something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    # 4. 20 greedy tokens from our cached decoder equal transformers' generate. Without an end-of-text id it
    #    cannot stop early, so all 20 are compared.
    prompt = ids[0]
    new = modeling.generate(ours, [prompt], 20, stop_ids=None)[0]
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    assert out[0, :len(prompt)].tolist() == prompt
    assert new == out[0, len(prompt):].tolist() and len(new) == 20

    # 5. ... and they read the same: our decoder and transformers' give one string, prompt included.
    assert tok.decode(prompt + new) == oracle.decode(out[0].tolist())
    assert tok.decode(new) == oracle.decode(out[0, len(prompt):].tolist())
