"""Prompt tuning (model.SoftPrompt) against transformers and PEFT: a model given the virtual ids of its soft prompt
computes what transformers computes with the prompt vectors prepended to the input embeddings (inputs_embeds), for
logits and for greedy generation; training moves the prompt vectors and nothing else; the export is a PEFT
prompt-tuning adapter that PEFT loads and generates the same replies from; a malformed file is named."""
import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

import data  # noqa: E402
import dpo  # noqa: E402
import model as M  # noqa: E402
from conftest import SEED, hf_gpt2, hf_llama, seeded  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
N_VIRTUAL = 5


def prompted(tmp_path, family):
    """(our model with a soft prompt whose vectors are random, the transformers model with the same weights)."""
    hf = (hf_gpt2 if family == "gpt2" else hf_llama)(tmp_path / family, offset=3)
    ours = M.load_model(tmp_path / family)
    ids = M.add_soft_prompt(ours, N_VIRTUAL, init_ids=[5, 6, 7])
    with torch.no_grad():  # random vectors: an init copied from the embedding would hide a wrong lookup
        ours.soft_prompt.vectors.normal_(0, 0.5, generator=seeded(11))
    return ours, hf, ids


def hf_logits_with_prompt(hf, vectors, ids: list[int]) -> torch.Tensor:
    """transformers' logits for [prompt vectors; embeddings of ids] (the definition of prompt tuning), (1, n+T, V)."""
    emb = hf.get_input_embeddings()(torch.tensor([ids]))                     # (1, T, C)
    return hf(inputs_embeds=torch.cat([vectors[None].to(emb.dtype), emb], dim=1)).logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_virtual_ids_equal_prompt_vectors_prepended_to_the_embeddings(tmp_path, family):
    ours, hf, virtual = prompted(tmp_path, family)
    V = hf.config.vocab_size
    assert virtual == list(range(V, V + N_VIRTUAL))
    text = torch.randint(0, V, (12,), generator=seeded(5)).tolist()
    with torch.no_grad():
        mine = ours(torch.tensor([virtual + text]))
        theirs = hf_logits_with_prompt(hf, ours.soft_prompt.vectors, text)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_with_the_soft_prompt_equals_greedy_decoding_of_the_prepended_forward(tmp_path, family):
    """Batched, left-padded, cached decoding from virtual ids + prompt == token-by-token argmax of transformers'
    full forward over [vectors; embeddings] (no cache, no padding: nothing shared with our code path)."""
    ours, hf, virtual = prompted(tmp_path, family)
    V, n_new = hf.config.vocab_size, 8
    g = seeded(7)
    prompts = [torch.randint(0, V, (T,), generator=g).tolist() for T in (3, 9, 6)]
    got = M.generate(ours, [virtual + p for p in prompts], n_new)
    for p, new in zip(prompts, got):
        seq = list(p)
        with torch.no_grad():
            for _ in range(n_new):
                seq.append(int(hf_logits_with_prompt(hf, ours.soft_prompt.vectors, seq)[0, -1].argmax()))
        assert new == seq[len(p):], f"seed {SEED}"


def test_training_moves_only_the_prompt_vectors(tmp_path):
    ours, _, virtual = prompted(tmp_path, "gpt2")
    frozen = {k: v.clone() for k, v in ours.state_dict().items() if not k.startswith("soft_prompt.")}
    before = ours.soft_prompt.vectors.detach().clone()
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["soft_prompt.vectors"]
    g = seeded(9)
    feats = []
    for _ in range(4):
        prompt, target = torch.randint(0, 150, (6,), generator=g).tolist(), torch.randint(0, 150, (3,), generator=g)
        feats.append({"input_ids": virtual + prompt + target.tolist(), "labels": [-100] * (N_VIRTUAL + 6) +
                      target.tolist()})
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path / "train"), batch_size=2, epochs=1, lr=1e-2,
                          warmup_steps=0, progress=False, save_minutes=0)
    dpo.train(ours, cfg, feats, lambda fs: data.collate_sft(fs, 0))
    after = ours.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())     # every model weight bit-identical
    assert (ours.soft_prompt.vectors.detach() != before).float().mean() > 0.99
    # the export holds the frozen weights and the vectors beside them; loading gives the trained model back
    final = tmp_path / "train" / "final"
    again = M.load_model(final)
    assert M.load_soft_prompt(again, final / M.SOFT_PROMPT_DIR) == virtual
    ids = torch.tensor([virtual + [1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours.eval()(ids), atol=0, rtol=0)


def test_the_exported_soft_prompt_is_a_peft_adapter_that_gives_our_replies(tmp_path):
    """PEFT (the reference prompt-tuning implementation) loads the export's soft_prompt/ onto transformers' model
    of the export's weights, and greedy decoding with its forward gives our tokens. (Its forward, not its
    generate(): with peft 0.21.2 and transformers 5.24, PEFT's cached generate() for prompt tuning on GPT-2 departs
    from PEFT's own uncached forward after a few tokens, while that forward, ours and the inputs_embeds
    definition above agree.)"""
    peft = pytest.importorskip("peft")
    ours, _, virtual = prompted(tmp_path, "gpt2")
    dpo.export_model(ours, tmp_path / "final")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "final" / M.SOFT_PROMPT_DIR).eval()
    assert theirs.peft_config["default"].num_virtual_tokens == N_VIRTUAL
    prompt, n_new = torch.randint(0, 150, (7,), generator=seeded(13)).tolist(), 6
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n_new):
            ids = torch.tensor([seq])
            seq.append(int(theirs(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()))
    assert seq[len(prompt):] == M.generate(ours, [virtual + prompt], n_new)[0], f"seed {SEED}"


def test_a_soft_prompt_of_the_wrong_width_is_named(tmp_path):
    ours, _, _ = prompted(tmp_path, "gpt2")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"prompt_embeddings": torch.zeros(4, 7)}, str(bad / "adapter_model.safetensors"))
    fresh = M.load_model(tmp_path / "gpt2")
    with pytest.raises(M.CheckpointError, match=r"adapter_model.safetensors: expected 'prompt_embeddings' of shape "
                                                r"\(n, 48\)"):
        M.load_soft_prompt(fresh, bad)
    with pytest.raises(M.CheckpointError, match="adapter_model.safetensors does not exist"):
        M.load_soft_prompt(fresh, tmp_path)
    (bad / "adapter_model.safetensors").write_bytes(b"\0" * 5)
    with pytest.raises(M.CheckpointError, match="adapter_model.safetensors: corrupt or truncated"):
        M.load_soft_prompt(fresh, bad)
    with pytest.raises(RuntimeError, match="already has a soft prompt"):
        M.add_soft_prompt(ours, 2, [1])
