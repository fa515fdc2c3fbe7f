"""Fine-tune an NLI classifier (nli.py's RoBERTa) on labelled (premise, hypothesis, label) pairs, with dpo.py's
training loop: e.g. roberta-large-mnli on Dialogue NLI, the C.score model of the paper.

    python extras/nli_finetune.py --model roberta-large-mnli --train dnli_train.jsonl --out runs/nli

Writes OUT/model (Hugging Face layout + tokenizer files: nli.load_nli and transformers read it), OUT/train (the
training run: log.jsonl, checkpoints) and OUT/finetune.json (held-out accuracy before and after).
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from data import IGNORE  # noqa: E402
from dpo import TrainConfig, load_trainable, train  # noqa: E402
from model import resolve_model_dir, write_json  # noqa: E402
from nli import NLI_LABELS, NLIClassifier, RobertaClassifier, load_nli, save_classifier  # noqa: E402


class ClassifierAsLM(nn.Module):
    """Presents the classifier to dpo.train's SFT mode, which maximizes summed label log-probs of a causal LM:
    logits (B, 2, L) whose position 0 holds the class logits and labels (B, 2) = [IGNORE, y]. After dpo.py's
    shift by one, the only target is y predicted from position 0, so "SFT loss" = cross-entropy.

    dpo.train calls model(input_ids) without a mask, so the mask is rebuilt here from <pad>: RoBERTa's pad
    is a special id that tokenizer.encode never produces (specials only come from code), the same rule
    fairseq and Hugging Face use for RoBERTa positions."""

    def __init__(self, clf: RobertaClassifier):
        super().__init__()
        self.clf = clf

    def forward(self, input_ids):
        mask = (input_ids != self.clf.config.pad_token_id).long()
        logits = self.clf(input_ids, mask)  # (B, L)
        return torch.stack([logits, torch.zeros_like(logits)], dim=1)  # (B, 2, L)


def read_pairs(path) -> list[tuple[str, str, int]]:
    """JSONL lines {"premise": str, "hypothesis": str, "label": "entailment"|"neutral"|"contradiction"}.
    Returns (premise, hypothesis, label index in NLI_LABELS)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                p, h, y = d["premise"], d["hypothesis"], str(d["label"]).strip().lower()
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{ln}: expected {{'premise', 'hypothesis', 'label'}} JSON ({e})") from None
            if y not in NLI_LABELS:
                raise ValueError(f"{path}:{ln}: label {d['label']!r} is not one of {NLI_LABELS}")
            out.append((p, h, NLI_LABELS.index(y)))
    if not out:
        raise ValueError(f"{path}: no pairs")
    return out


def accuracy(nli: NLIClassifier, pairs: list[tuple[str, str, int]], batch_size: int = 32) -> float:
    probs = nli.predict([p for p, _, _ in pairs], [h for _, h, _ in pairs], batch_size=batch_size)
    gold = torch.tensor([y for _, _, y in pairs])
    return (probs.argmax(-1) == gold).float().mean().item()


def split_pairs(pairs: list, valid_fraction: float, seed: int, where) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, then the first valid_fraction of it held out."""
    shuffled = pairs[:]
    random.Random(seed).shuffle(shuffled)
    k = max(1, round(len(shuffled) * valid_fraction))
    if k >= len(shuffled):
        raise ValueError(f"{where}: {len(shuffled)} pairs are too few to hold out {k}")
    return shuffled[k:], shuffled[:k]


def finetune(model_dir, train_path, out_dir, valid_path=None, valid_fraction: float = 0.1, epochs: float = 1.0,
             lr: float = 1e-5, batch_size: int = 16, eval_every: int = 0, seed: int = 0, max_steps=None,
             progress: bool = True) -> dict:
    """Fine-tune an NLI classifier with dpo.train (mode "sft" on ClassifierAsLM); keep the weights with the best
    held-out accuracy; save them (HF layout + tokenizer files) to out_dir/model. Returns accuracies."""
    src = resolve_model_dir(model_dir)
    nli = load_nli(src)
    if valid_path is not None:
        train_pairs, valid_pairs = read_pairs(train_path), read_pairs(valid_path)
    else:
        train_pairs, valid_pairs = split_pairs(read_pairs(train_path), valid_fraction, seed, train_path)
    before = accuracy(nli, valid_pairs)

    pad = nli.model.config.pad_token_id
    # labels in the checkpoint's own index space, so the saved model keeps its id2label
    features = [{"input_ids": nli.encode(p, h), "labels": [IGNORE, nli.order[y]]} for p, h, y in train_pairs]

    def collate(batch: list[dict]) -> dict:
        T = max(len(f["input_ids"]) for f in batch)
        ids = torch.tensor([f["input_ids"] + [pad] * (T - len(f["input_ids"])) for f in batch])
        return {"input_ids": ids, "labels": torch.tensor([f["labels"] for f in batch])}

    net = ClassifierAsLM(nli.model)
    steps_per_epoch = max(1, len(features) // batch_size)
    cfg = TrainConfig(mode="sft", out_dir=str(Path(out_dir) / "train"), batch_size=batch_size, lr=lr, epochs=epochs,
                      max_steps=max_steps, seed=seed, warmup_steps=min(100, steps_per_epoch // 10),
                      eval_every=eval_every or steps_per_epoch, progress=progress)
    # eval_fn: nli.model is net.clf, the weights being trained
    result = train(net, cfg, features, collate, eval_fn=lambda m: accuracy(nli, valid_pairs), export=False)
    if result["best_dir"] is not None:
        load_trainable(net, Path(cfg.out_dir) / result["best_dir"])
    nli.model.eval()
    after = accuracy(nli, valid_pairs)
    saved = save_classifier(nli.model, Path(out_dir) / "model", tokenizer_from=src)
    report = {"train_pairs": len(train_pairs), "valid_pairs": len(valid_pairs), "valid_accuracy_before": before,
              "valid_accuracy_after": after, "steps": result["step"], "model_dir": str(saved)}
    write_json(Path(out_dir) / "finetune.json", report)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fine-tune a RoBERTa NLI classifier on JSONL {premise, hypothesis, "
                                 "label} pairs with dpo.py's training loop")
    ap.add_argument("--model", required=True, help="local dir or hub id of a RobertaForSequenceClassification")
    ap.add_argument("--train", required=True, help="JSONL training pairs")
    ap.add_argument("--valid", default=None, help="JSONL held-out pairs (default: --valid-fraction of --train)")
    ap.add_argument("--valid-fraction", type=float, default=0.1)
    ap.add_argument("--out", required=True, help="output directory (model/ in HF layout, train/, finetune.json)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: each epoch)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    report = finetune(args.model, args.train, args.out, valid_path=args.valid, valid_fraction=args.valid_fraction,
                      epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, eval_every=args.eval_every,
                      seed=args.seed, max_steps=args.max_steps)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
