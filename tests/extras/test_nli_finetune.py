"""extras/nli_finetune.py: fine-tuning nli.py's RoBERTa classifier through dpo.py's loop, and its pair reader."""
import json
import random

import pytest
import torch

import nli as N
from infra.tokfiles import byte_to_unicode
from extras import nli_finetune as FT

LABELS = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}  # roberta-large-mnli's order and spelling


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread; on a busy 2-core machine intra-op threading made the fine-tuning
    test 10x slower. Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _byte_tokenizer_dir(d):
    """A RoBERTa-layout tokenizer with a 264-id vocab (the 256 byte symbols + 3 merges): tiny embeddings, fast."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for b in range(256):
        vocab[byte_to_unicode()[b]] = len(vocab)
    merges = ["Ġ n", "o g", "Ġ y"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def _save_trainable_hf(d, vocab_size):
    """A tiny RobertaForSequenceClassification with transformers' own init (easy to fine-tune), dropout off."""
    import transformers

    cfg = transformers.RobertaConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    transformers.RobertaForSequenceClassification(cfg).save_pretrained(d)


def test_finetune_cli_learns_and_saves_hf_layout(tmp_path):
    """`extras/nli_finetune.py` through dpo.py's loop on a task a tiny model can learn (the label is a cue word):
    held-out accuracy rises, and the saved model is a RobertaForSequenceClassification transformers loads."""
    import transformers

    src = tmp_path / "base"
    src.mkdir()
    _save_trainable_hf(src, vocab_size=_byte_tokenizer_dir(src))
    rng = random.Random(0)
    words = "dogs cats skiing music nurse".split()
    # one cue letter no other word has (z / q / y): learnable from a bag of tokens, wherever it lands
    cue = {"contradiction": "zero", "neutral": "quite", "entailment": "yes"}
    rows = []
    for i in range(184):
        y = rng.choice(N.NLI_LABELS)
        rows.append({"premise": f"i like {rng.choice(words)}", "hypothesis": f"{cue[y]} , {rng.choice(words)}",
                     "label": y.upper() if i % 2 else y})  # names are case-insensitive
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    FT.main(["--model", str(src), "--train", str(tmp_path / "pairs.jsonl"), "--out", str(out),
             "--valid-fraction", "0.13", "--epochs", "5", "--lr", "5e-3", "--batch-size", "16", "--eval-every", "25",
             "--seed", "0"])
    report = json.loads((out / "finetune.json").read_text())
    assert report["train_pairs"] == 160 and report["valid_pairs"] == 24 and report["steps"] == 50
    assert report["valid_accuracy_after"] >= 0.75 > report["valid_accuracy_before"], report

    # the saved directory: our loader and transformers agree on it, and it still predicts as trained
    hf = transformers.RobertaForSequenceClassification.from_pretrained(str(out / "model")).eval()
    ours = N.load_classifier(out / "model")
    ids = torch.tensor([[0, 5, 6, 7, 2, 2, 8, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert hf.config.id2label == LABELS
    clf = N.load_nli(out / "model")
    acc = FT.accuracy(clf, [(r["premise"], r["hypothesis"], N.NLI_LABELS.index(r["label"].lower())) for r in rows])
    assert acc >= 0.75


def test_read_pairs_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"premise": "a", "hypothesis": "b", "label": "entailment"}\n{"premise": "a", "label": "neutral"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        FT.read_pairs(p)
    p.write_text('{"premise": "a", "hypothesis": "b", "label": "yes"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: label 'yes'"):
        FT.read_pairs(p)


# Dialogue NLI rows in the layout of its release (dialogue_nli_{train,dev,test}.jsonl: ONE JSON array, despite the
# name), with DNLI's polarity labels. The expected (premise, hypothesis, label index) are written out by hand:
# NLI_LABELS = (contradiction 0, neutral 1, entailment 2); positive -> 2, neutral -> 1, negative -> 0.
DNLI_ROWS = [
    {"label": "positive", "sentence1": "i have two dogs .", "sentence2": "my dogs are my best friends .",
     "triple1": ["i", "have_pet", "dog"], "triple2": ["i", "have_pet", "dog"], "dtype": "matchingtriple_up",
     "id": "dialogue_nli_train_0"},
    {"label": "negative", "sentence1": "i am a vegan .", "sentence2": "i eat steak every night .",
     "triple1": ["i", "has_diet", "vegan"], "triple2": ["i", "like_food", "steak"], "dtype": "misc_up",
     "id": "dialogue_nli_train_1"},
    {"label": "neutral", "sentence1": "i like to ski .", "sentence2": "my mother is a nurse .",
     "triple1": ["i", "like_activity", "skiing"], "triple2": ["i", "has_profession", "nurse"],
     "dtype": "random_up", "id": "dialogue_nli_train_2"},
    {"label": "Negative", "sentence1": "i live in ohio .", "sentence2": "i have never been to the us .",
     "triple1": ["i", "live_in_citystatecountry", "ohio"], "triple2": ["i", "never", "us"],
     "dtype": "negation_up", "id": "dialogue_nli_train_3"},
    {"label": "positive", "sentence1": "i play the guitar .", "sentence2": "i am a musician .",
     "triple1": ["i", "like_music", "guitar"], "triple2": ["i", "has_profession", "musician"],
     "dtype": "matchingtriple_pp", "id": "dialogue_nli_train_4"},
    {"label": "neutral", "sentence1": "i drive a truck .", "sentence2": "i love pizza .",
     "triple1": ["i", "have_vehicle", "truck"], "triple2": ["i", "like_food", "pizza"], "dtype": "random_pp",
     "id": "dialogue_nli_train_5"},
    {"label": "negative", "sentence1": "i am an only child .", "sentence2": "my sister is older than me .",
     "triple1": ["i", "has_sibling", "none"], "triple2": ["i", "has_sibling", "sister"], "dtype": "misc_pp",
     "id": "dialogue_nli_train_6"},
]
DNLI_EXPECTED = [
    ("i have two dogs .", "my dogs are my best friends .", 2),
    ("i am a vegan .", "i eat steak every night .", 0),
    ("i like to ski .", "my mother is a nurse .", 1),
    ("i live in ohio .", "i have never been to the us .", 0),
    ("i play the guitar .", "i am a musician .", 2),
    ("i drive a truck .", "i love pizza .", 1),
    ("i am an only child .", "my sister is older than me .", 0),
]


def test_read_pairs_dialogue_nli_json_array(tmp_path):
    """A file as Dialogue NLI distributes it: one JSON array on one line, sentence1 = premise, sentence2 =
    hypothesis, positive / neutral / negative = entailment / neutral / contradiction (names case-insensitive)."""
    p = tmp_path / "dialogue_nli_train.jsonl"
    p.write_text(json.dumps(DNLI_ROWS))
    assert FT.read_pairs(p) == DNLI_EXPECTED
    p.write_text("\ufeff" + json.dumps(DNLI_ROWS, indent=2) + "\n")  # pretty-printed, with a byte-order mark
    assert FT.read_pairs(p) == DNLI_EXPECTED
    assert [N.NLI_LABELS[y] for _, _, y in DNLI_EXPECTED] == [FT.DNLI_LABELS[r["label"].lower()] for r in DNLI_ROWS]


def test_read_pairs_dialogue_nli_json_lines_and_project_array(tmp_path):
    """The same rows as JSON lines (blank lines skipped) read the same; the project's own layout as an array too."""
    p = tmp_path / "dnli_lines.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in DNLI_ROWS[:3]) + "\n\n" +
                 "\n".join(json.dumps(r) for r in DNLI_ROWS[3:]) + "\n")
    assert FT.read_pairs(p) == DNLI_EXPECTED
    names = {0: "contradiction", 1: "neutral", 2: "entailment"}
    ours = [{"premise": a, "hypothesis": b, "label": names[y]} for a, b, y in DNLI_EXPECTED]
    p.write_text(json.dumps(ours))
    assert FT.read_pairs(p) == DNLI_EXPECTED


def test_read_pairs_dialogue_nli_errors_name_file_and_index(tmp_path):
    p = tmp_path / "dnli.jsonl"

    def error_of(rows) -> str:
        p.write_text(rows if isinstance(rows, str) else json.dumps(rows))
        with pytest.raises(ValueError) as e:
            FT.read_pairs(p)
        return str(e.value)

    bad = [dict(r) for r in DNLI_ROWS]
    bad[3]["label"] = "maybe"
    msg = error_of(bad)
    assert msg.startswith(f"{p}[3]: label 'maybe' is not one of ('positive', 'neutral', 'negative')"), msg
    bad = [dict(r) for r in DNLI_ROWS]
    bad[4]["label"] = "entailment"  # the other layout's names are not DNLI's
    assert error_of(bad).startswith(f"{p}[4]: label 'entailment'")
    bad = [dict(r) for r in DNLI_ROWS]
    del bad[2]["sentence2"]
    assert error_of(bad).startswith(f"{p}[2]: expected a JSON object with keys {{'sentence1', 'sentence2', 'label'}}")
    bad = DNLI_ROWS[:1] + [{"premise": "a", "hypothesis": "b", "label": "neutral"}]  # layouts mixed in one file
    assert error_of(bad).startswith(f"{p}[1]: expected a JSON object with keys {{'sentence1'")
    assert error_of(DNLI_ROWS[:1] + [["a", "b", "neutral"]]).startswith(f"{p}[1]: expected a JSON object")
    bad = [dict(r) for r in DNLI_ROWS]
    bad[5]["sentence1"] = None
    assert error_of(bad).startswith(f"{p}[5]: 'sentence1' and 'sentence2' must be strings")
    assert error_of([{"text": "a", "label": "neutral"}]).startswith(f"{p}[0]: expected a JSON object with keys")
    assert error_of(json.dumps(DNLI_ROWS)[:-40]).startswith(f"{p}:1:")  # a cut-off array: its line and column
    assert error_of("[]") == f"{p}: no pairs"
    lines = [json.dumps(r) for r in DNLI_ROWS]
    lines[5] = lines[5].replace('"neutral"', '"unsure"')
    assert error_of("\n".join(lines)).startswith(f"{p}:6: label 'unsure'")
    assert error_of("\n".join(lines[:2] + ['{"sentence1": "a",'])).startswith(f"{p}:3: not a JSON line")


def test_finetune_cli_on_dialogue_nli_files(tmp_path):
    """The documented command, shrunk: --train / --valid / --test given Dialogue NLI files as distributed (arrays;
    the dev file here as JSON lines) runs end to end and writes OUT/model, OUT/train and OUT/finetune.json."""
    src = tmp_path / "roberta-large-mnli"
    src.mkdir()
    _save_trainable_hf(src, vocab_size=_byte_tokenizer_dir(src))
    rows = [dict(r, id=f"dialogue_nli_train_{i}") for i, r in enumerate(DNLI_ROWS * 3)]
    (tmp_path / "dialogue_nli_train.jsonl").write_text(json.dumps(rows))
    (tmp_path / "dialogue_nli_dev.jsonl").write_text("\n".join(json.dumps(r) for r in DNLI_ROWS[:6]) + "\n")
    (tmp_path / "dialogue_nli_test.jsonl").write_text(json.dumps(DNLI_ROWS[1:]))
    out = tmp_path / "runs" / "nli"
    FT.main(["--model", str(src), "--train", str(tmp_path / "dialogue_nli_train.jsonl"),
             "--valid", str(tmp_path / "dialogue_nli_dev.jsonl"), "--test", str(tmp_path / "dialogue_nli_test.jsonl"),
             "--out", str(out), "--batch-size", "4", "--max-steps", "2", "--eval-every", "1"])
    report = json.loads((out / "finetune.json").read_text())
    assert (report["train_pairs"], report["valid_pairs"], report["test_pairs"], report["steps"]) == (21, 6, 6, 2)
    for k in ("valid_accuracy_before", "valid_accuracy_after", "test_accuracy_before", "test_accuracy_after"):
        assert 0.0 <= report[k] <= 1.0, report
    assert (out / "train" / "log.jsonl").is_file()
    clf = N.load_nli(out / "model")
    assert FT.accuracy(clf, FT.read_pairs(tmp_path / "dialogue_nli_dev.jsonl")) == pytest.approx(
        report["valid_accuracy_after"])
