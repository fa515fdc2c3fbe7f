"""extras/nli_finetune.py: fine-tuning nli.py's RoBERTa classifier through dpo.py's loop, and its pair reader."""
import json
import random

import pytest
import torch

import nli as N
from data import byte_to_unicode
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
