"""nli.py against transformers' RobertaForSequenceClassification (tiny random configs saved in HF layout), and
C.score on hand-built cases with a classifier whose outputs are known."""
import json

import pytest
import torch
from conftest import C, E, NEU, FakeNLI, shared_file, write_roberta_tokenizer

import data
import nli as N

LABELS = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}  # roberta-large-mnli's order and spelling


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (a busy 2-core machine is 10x slower with intra-op threading).
    Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _save_random_hf(d, vocab_size, id2label=LABELS, seed=0, layers=2, scale=0.3):
    """A tiny random RobertaForSequenceClassification saved by transformers. Weights are re-drawn with a large
    scale so that logits differ clearly between inputs (HF's 0.02 init makes every output nearly equal)."""
    import transformers

    cfg = transformers.RobertaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(seed)
    model = transformers.RobertaForSequenceClassification(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    model.save_pretrained(d)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_nli")
    return d, _save_random_hf(d, vocab_size=100)


@pytest.fixture(scope="module")
def roberta_text_dir(tmp_path_factory):
    """Tiny random classifier + a RoBERTa-layout tokenizer (GPT-2's merges, ids permuted as fairseq's are)."""
    d = tmp_path_factory.mktemp("roberta_nli")
    n = write_roberta_tokenizer(d, seed=3, keep_endoftext=False)
    hf = _save_random_hf(d, vocab_size=n, id2label={0: "entailment", 1: "Contradiction", 2: "neutral"})
    return d, hf


@pytest.fixture(scope="module")
def text_clf(roberta_text_dir):
    """Our NLIClassifier for roberta_text_dir, loaded once (building the BPE tables takes a moment)."""
    return N.load_nli(roberta_text_dir[0])


@pytest.fixture(scope="module")
def persona_texts():
    """(responses, persona sentences) from PERSONA-CHAT valid."""
    path = shared_file("data/personachat/valid_self_original.txt")
    responses, personas = [], []
    for line in open(path, encoding="utf-8"):
        _, _, rest = line.rstrip("\n").partition(" ")
        if rest.startswith("your persona: "):
            personas.append(rest[len("your persona: "):])
        elif "\t" in rest:
            responses.append(rest.split("\t")[1])
    return responses, personas


def _hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


# ---------------------------------------------------------------------------------------------- model vs HF


def test_config_from_hf(tiny):
    d, hf = tiny
    cfg = N.RobertaConfig.from_hf(json.loads((d / "config.json").read_text()))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (32, 2, 4, 100)
    assert cfg.id2label == LABELS and cfg.max_tokens == 66 - 2
    with pytest.raises(KeyError, match="hidden_size"):
        N.RobertaConfig.from_hf({"model_type": "roberta", "vocab_size": 3})
    with pytest.raises(ValueError, match="model_type"):
        N.RobertaConfig.from_hf({"model_type": "gpt2"})


def test_logits_single_sequences_equal_hf(tiny):
    d, hf = tiny
    ours = N.load_classifier(d)
    g = torch.Generator().manual_seed(0)
    for T in (1, 2, 7, 30, 64):  # 64 = the longest the position table allows
        ids = torch.randint(3, 100, (1, T), generator=g)
        ids[0, 0], ids[0, -1] = 0, 2
        with torch.no_grad():
            got = ours(ids)
        torch.testing.assert_close(got, _hf_logits(hf, ids), atol=1e-5, rtol=0)


def test_logits_padded_batch_equal_hf_and_rows_alone(tiny):
    d, hf = tiny
    ours = N.load_classifier(d)
    g = torch.Generator().manual_seed(1)
    lens = [12, 5, 9, 1, 12, 3]
    ids = torch.full((len(lens), max(lens)), 1)  # <pad> = 1
    for i, n in enumerate(lens):
        ids[i, :n] = torch.randint(3, 100, (n,), generator=g)
    mask = (torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]).long()
    with torch.no_grad():
        got = ours(ids, mask)
        alone = torch.cat([ours(ids[i:i + 1, :n]) for i, n in enumerate(lens)])
    torch.testing.assert_close(got, _hf_logits(hf, ids, mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)  # padding changes nothing
    assert (got.std(0) > 1e-3).all()  # rows differ 100x more than the tolerance: the comparison is not vacuous


def test_predict_text_pairs_equal_hf(roberta_text_dir, text_clf, persona_texts):
    import transformers

    d, hf = roberta_text_dir
    tok = transformers.RobertaTokenizerFast.from_pretrained(str(d))
    clf = text_clf
    responses, personas = persona_texts
    premises, hypotheses = responses[:40], personas[:40]
    got = clf.predict(premises, hypotheses, batch_size=16)
    enc = tok(premises, hypotheses, padding=True, return_tensors="pt")
    probs = torch.softmax(_hf_logits(hf, enc["input_ids"], enc["attention_mask"]), -1)
    # this checkpoint says 0 = entailment, 1 = contradiction, 2 = neutral; ours is (c, n, e)
    torch.testing.assert_close(got, probs[:, [1, 2, 0]], atol=1e-5, rtol=0)
    assert got.shape == (40, 3) and torch.allclose(got.sum(-1), torch.ones(40))
    torch.testing.assert_close(clf.predict(premises, hypotheses, batch_size=1), got, atol=1e-5, rtol=0)


def test_long_pairs_are_truncated(text_clf):
    clf = text_clf
    long_a, long_b = "i like dogs . " * 40, "my cat is black " * 30
    ids = clf.encode(long_a, long_b)
    assert len(ids) == clf.model.config.max_tokens
    assert ids[0] == 0 and ids[-1] == 2 and ids.count(2) == 3  # <s> a </s></s> b </s> kept
    assert clf.predict([long_a, "hi"], [long_b, "hello"]).shape == (2, 3)


@pytest.mark.parametrize("id2label", [
    {0: "entailment", 1: "neutral", 2: "contradiction"},
    {0: "Neutral", 1: "CONTRADICTION", 2: "Entailment"},
])
def test_permuted_id2label(tmp_path, id2label):
    hf = _save_random_hf(tmp_path, vocab_size=100, id2label=id2label, seed=5)
    clf = N.NLIClassifier(N.load_classifier(tmp_path))
    seqs = [[0, 5, 6, 2, 2, 7, 8, 2], [0, 9, 2, 2, 10, 11, 12, 13, 2]]
    got = clf.predict_ids(seqs)
    name_to_id = {v.lower(): k for k, v in id2label.items()}
    for row, s in enumerate(seqs):
        p = torch.softmax(_hf_logits(hf, torch.tensor([s]))[0], -1)
        want = torch.stack([p[name_to_id[n]] for n in ("contradiction", "neutral", "entailment")])
        torch.testing.assert_close(got[row], want, atol=1e-5, rtol=0)


def test_label_errors_and_override(tmp_path):
    _save_random_hf(tmp_path, vocab_size=100, id2label={0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    model = N.load_classifier(tmp_path)
    with pytest.raises(ValueError, match="label_names"):
        N.NLIClassifier(model)
    clf = N.NLIClassifier(model, label_names=["neutral", "entailment", "contradiction"])
    assert clf.order == [2, 0, 1]
    with pytest.raises(ValueError, match="twice"):
        N.label_order({0: "neutral", 1: "Neutral", 2: "entailment"})


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    _save_random_hf(tmp_path, vocab_size=100)
    sd = load_file(str(tmp_path / "model.safetensors"))
    # extra pooler weights (roberta-large-mnli ships them) are ignored by name
    sd2 = dict(sd, **{"roberta.pooler.dense.weight": torch.zeros(32, 32), "roberta.pooler.dense.bias": torch.zeros(32)})
    save_file(sd2, str(tmp_path / "model.safetensors"))
    N.load_classifier(tmp_path)
    # a missing key and an unknown key are named
    sd3 = {k: v for k, v in sd.items() if k != "classifier.out_proj.bias"}
    sd3["roberta.encoder.layer.0.extra.weight"] = torch.zeros(1)
    save_file(sd3, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"classifier\.out_proj\.bias.*extra\.weight"):
        N.load_classifier(tmp_path)
    # a shape that disagrees with config.json is named with both shapes
    sd4 = dict(sd, **{"roberta.embeddings.word_embeddings.weight": torch.zeros(99, 32)})
    save_file(sd4, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"word_embeddings\.weight has shape \(99, 32\).*\(100, 32\)"):
        N.load_classifier(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        N.load_classifier(tmp_path)


# ---------------------------------------------------------------------------------------------- C.score
# FakeNLI (known outputs) and C, NEU, E (contradiction, neutral, entailment): conftest.py

def test_c_score_hand_built():
    personas_a = ["i have two dogs .", "i like to ski .", "i am a nurse ."]
    personas_b = ["i hate the snow .", "i am vegan ."]
    table = {
        (personas_a[0], "my dogs are great"): E, (personas_a[1], "my dogs are great"): NEU,
        (personas_a[2], "my dogs are great"): E,                         # C = 1 + 0 + 1 = 2
        (personas_b[0], "i love steak"): NEU, (personas_b[1], "i love steak"): C,   # C = 0 - 1 = -1
        (personas_b[0], "hello"): C, (personas_b[1], "hello"): [0.34, 0.33, 0.33],  # C = -1 - 1 = -2
    }
    fake = FakeNLI(table)
    score, per = N.c_score(["my dogs are great", "i love steak", "hello"], [personas_a, personas_b, personas_b],
                           fake, return_per_response=True, aggregate="sum")
    assert per == [2.0, -1.0, -2.0]
    assert score == pytest.approx((2 - 1 - 2) / 3)
    # premise = the persona sentence, hypothesis = the response (the PAL authors' evaluation)
    premises, hypotheses = fake.calls[0]
    assert premises[0] == personas_a[0] and hypotheses[0] == "my dogs are great"
    assert N.c_score(["x"], [[]], fake) == 0.0  # no persona sentence: C(u) = 0
    with pytest.raises(ValueError):
        N.c_score(["x"], [], fake)
    with pytest.raises(TypeError, match="list of persona sentences"):
        N.c_score(["x"], ["i have a dog"], fake)
    with pytest.raises(ValueError, match="unavailable"):
        N.c_score(["x"], [["p"]], None)


def test_load_nli_unknown_hub_id_offline(monkeypatch, tmp_path):
    pytest.importorskip("model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(FileNotFoundError, match="roberta-large-mnli"):
        N.load_nli("FacebookAI/roberta-large-mnli")


def test_c_score_with_real_classifier_matches_hf_argmax(roberta_text_dir, text_clf, persona_texts):
    """End to end: our loader + tokenizer + C.score against HF's argmax on the same pairs."""
    import transformers

    d, hf = roberta_text_dir
    responses, personas = persona_texts
    resp, pers = responses[:6], [personas[i:i + 4] for i in range(0, 24, 4)]
    tok = transformers.RobertaTokenizerFast.from_pretrained(str(d))
    value = {0: 1, 1: -1, 2: 0}  # this checkpoint: 0 entailment, 1 contradiction, 2 neutral
    want_max, want_sum = [], []
    for r, ps in zip(resp, pers):
        enc = tok(ps, [r] * len(ps), padding=True, return_tensors="pt")  # premise = persona, hypothesis = response
        labels = _hf_logits(hf, enc["input_ids"], enc["attention_mask"]).argmax(-1).tolist()
        want_max.append(max(value[y] for y in labels))
        want_sum.append(sum(value[y] for y in labels))
    out = N.c_scores(resp, pers, text_clf)
    assert out["per_response_max"] == want_max and out["c_score"] == pytest.approx(sum(want_max) / len(want_max))
    assert out["per_response_sum"] == want_sum and out["c_score_sum"] == pytest.approx(sum(want_sum) / len(want_sum))


# ---------------------------------------------------------------------------------------------- persona labels


def test_nli_persona_labels():
    """Moved from tests/test_data_persona.py with nli_persona_labels itself (data.py -> nli.py)."""
    ex = [data.Example(["i ski.", "i swim."], ["hi"], "i swim a lot", None, 0),
          data.Example(["i ski.", "i swim."], ["hi"], "hello", None, 1)]
    calls = []

    def nli(premises, hypotheses):  # entails when the hypothesis' verb appears in the premise
        calls.append(len(premises))
        ent = [0.9 if h.split()[1].rstrip(".") in p else 0.1 for p, h in zip(premises, hypotheses)]
        return torch.tensor([[(1 - e) / 2, (1 - e) / 2, e] for e in ent])

    labels = N.nli_persona_labels(ex, nli, threshold=0.5, batch_size=3)
    assert labels == [1, None] and calls == [3, 1]
    assert [e.persona_label for e in data.relabel(ex, labels)] == [1, None]


def test_nli_persona_labels_threshold_ties_and_shape():
    ex = [data.Example(["a.", "b.", "c."], [], "r", None, 0)]

    def fixed(ent):
        return lambda p, h: torch.tensor([[0.0, 1 - e, e] for e in ent[:len(p)]])

    assert N.nli_persona_labels(ex, fixed([0.6, 0.8, 0.8])) == [1]  # highest wins; a tie keeps the lower index
    assert N.nli_persona_labels(ex, fixed([0.5, 0.2, 0.1])) == [0]  # the threshold itself counts
    assert N.nli_persona_labels(ex, fixed([0.4, 0.2, 0.1])) == [None]
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        N.nli_persona_labels(ex, lambda p, h: torch.zeros(len(p), 2))


def test_rename_table_covers_roberta_large_mnli_shapes():
    """roberta-large-mnli's architecture (its config.json values), built on the meta device by transformers and
    by us: the rename table maps every tensor to one of the same shape (no weights needed)."""
    import transformers

    hf_cfg = transformers.RobertaConfig(
        vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
        id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"})
    with torch.device("meta"):
        hf = transformers.RobertaForSequenceClassification(hf_cfg)
        ours = N.RobertaClassifier(N.RobertaConfig.from_hf(hf_cfg.to_dict()))
    theirs = {k: v.shape for k, v in hf.state_dict().items()}
    names = N.hf_names(ours.config)
    assert sorted(names.values()) == sorted(theirs)
    for k, v in ours.state_dict().items():
        assert theirs[names[k]] == v.shape, k
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
