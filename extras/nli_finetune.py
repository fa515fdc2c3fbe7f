"""Fine-tune an NLI classifier (nli.py's RoBERTa) on labelled (premise, hypothesis, label) pairs, with dpo.py's
training loop: e.g. roberta-large-mnli on Dialogue NLI, the C.score model of the paper.

    python extras/nli_finetune.py --model roberta-large-mnli --train dialogue_nli_train.jsonl \
        --valid dialogue_nli_dev.jsonl --out runs/nli

Reads this project's JSONL {"premise", "hypothesis", "label"} and Dialogue NLI's files as distributed (see
read_pairs). Writes OUT/model (Hugging Face layout + tokenizer files: nli.load_nli and transformers read it),
OUT/train (the training run: log.jsonl, checkpoints) and OUT/finetune.json (held-out accuracy before and after;
with --test, test accuracy too).
"""
import argparse
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from data import IGNORE  # noqa: E402
from dpo import TrainConfig, load_trainable, train  # noqa: E402
from infra.files import atomic_path, write_json  # noqa: E402
from infra.hub import resolve_model_dir  # noqa: E402
from nli import NLI_LABELS, TOKENIZER_FILES, NLIClassifier, RobertaClassifier, hf_names, load_nli  # noqa: E402


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


# Dialogue NLI (Welleck et al. 2019; public release linked from wellecks.github.io/dialogue_nli, also fetched by
# ParlAI's build.py as dialogue_nli.zip) ships dialogue_nli_{train,dev,test,verified_test}.jsonl. Despite the name,
# each file is ONE JSON array of {"label", "sentence1", "sentence2", "triple1", "triple2", "dtype", "id"}: ParlAI
# reads them with json.load (facebookresearch/ParlAI, parlai/tasks/dialogue_nli/agents.py), as does the release's
# own print_dtypes.py (jsonlines' read() of a single value). The labels are named by polarity; ParlAI's
# DNLI_LABEL_DICT maps positive -> entailment, negative -> contradiction, neutral -> neutral, and its teacher takes
# sentence1 as the premise, sentence2 as the hypothesis (DNLI_PREMISE_KEY, DNLI_HYPO_KEY). So do we.
DNLI_LABELS = {"positive": "entailment", "neutral": "neutral", "negative": "contradiction"}
# the two row layouts read_pairs knows: premise key, hypothesis key, label name -> name in NLI_LABELS
PAIR_FORMATS = {
    "pairs": ("premise", "hypothesis", {n: n for n in NLI_LABELS}),  # this project's own JSONL
    "dnli": ("sentence1", "sentence2", DNLI_LABELS),                  # Dialogue NLI as distributed
}


def read_records(path) -> list[tuple[str, object]]:
    """(where, row) for each row of a file that is either one JSON array (where = "FILE[i]", i the array index)
    or JSON lines (where = "FILE:LINE", blank lines skipped). Told apart by the first non-blank character."""
    text = Path(path).read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the JSON
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}:{e.colno}: not a valid JSON array ({e.msg})") from None
        return [(f"{path}[{i}]", row) for i, row in enumerate(rows)]
    out = []
    for ln, line in enumerate(text.split("\n"), 1):  # "\n" only: JSON strings may hold U+2028 and kin
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{ln}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{ln}: not a JSON line ({e.msg})") from None
    return out


def pair_format(where: str, row) -> str:
    """The name in PAIR_FORMATS of the layout whose premise key the row has."""
    for name, (premise_key, _, _) in PAIR_FORMATS.items():
        if isinstance(row, dict) and premise_key in row:
            return name
    raise ValueError(f"{where}: expected a JSON object with keys {{'premise', 'hypothesis', 'label'}} or Dialogue "
                     f"NLI's {{'sentence1', 'sentence2', 'label'}}, got {str(row)[:80]!r}")


def read_pairs(path) -> list[tuple[str, str, int]]:
    """Labelled pairs from a JSON array or JSON lines file in one of two layouts, told apart by the first row and
    then required of every row:
      {"premise": str, "hypothesis": str, "label": "entailment"|"neutral"|"contradiction"}   (this project's)
      {"sentence1": str, "sentence2": str, "label": "positive"|"neutral"|"negative", ...}    (Dialogue NLI's)
    Label names are case-insensitive. Returns (premise, hypothesis, label index in NLI_LABELS)."""
    records = read_records(path)
    if not records:
        raise ValueError(f"{path}: no pairs")
    fmt = pair_format(*records[0])
    premise_key, hypothesis_key, names = PAIR_FORMATS[fmt]
    out = []
    for where, row in records:
        missing = [k for k in (premise_key, hypothesis_key, "label") if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{where}: expected a JSON object with keys {{{premise_key!r}, {hypothesis_key!r}, "
                             f"'label'}} like the file's first row (missing {missing})")
        p, h, y = row[premise_key], row[hypothesis_key], str(row["label"]).strip().lower()
        if not (isinstance(p, str) and isinstance(h, str)):
            raise ValueError(f"{where}: {premise_key!r} and {hypothesis_key!r} must be strings")
        if y not in names:
            raise ValueError(f"{where}: label {row['label']!r} is not one of {tuple(names)}")
        out.append((p, h, NLI_LABELS.index(names[y])))
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


def config_to_hf(cfg) -> dict:
    """A RobertaConfig as Hugging Face's config.json of a RobertaForSequenceClassification."""
    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "id2label"}
    d["id2label"] = {str(k): v for k, v in cfg.id2label.items()}
    d["label2id"] = {v: k for k, v in cfg.id2label.items()}
    d.update(model_type="roberta", architectures=["RobertaForSequenceClassification"],
             position_embedding_type="absolute", bos_token_id=0, eos_token_id=2)
    return d


def save_classifier(model: RobertaClassifier, out_dir, tokenizer_from: Path | None = None) -> Path:
    """Write config.json + model.safetensors in Hugging Face's layout (transformers loads it as is), plus the
    tokenizer files of `tokenizer_from`; atomically."""
    out = Path(out_dir)
    names = hf_names(model.config)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file({names[n]: t.detach().cpu().contiguous() for n, t in model.state_dict().items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", config_to_hf(model.config))
        for f in TOKENIZER_FILES:
            if tokenizer_from is not None and (Path(tokenizer_from) / f).exists():
                shutil.copy2(Path(tokenizer_from) / f, tmp / f)
    return out


def finetune(model_dir, train_path, out_dir, valid_path=None, valid_fraction: float = 0.1, epochs: float = 1.0,
             lr: float = 1e-5, batch_size: int = 16, eval_every: int = 0, seed: int = 0, max_steps=None,
             progress: bool = True, test_path=None, resume: bool = False, save_minutes: float = 0.0) -> dict:
    """Fine-tune an NLI classifier with dpo.train (mode "sft" on ClassifierAsLM); keep the weights with the best
    held-out accuracy; save them (HF layout + tokenizer files) to out_dir/model. Returns accuracies: held-out
    (valid_path, else a seeded valid_fraction of train_path) and, with test_path, on a file that chose nothing.
    resume: go on from out_dir/train's latest checkpoint (one every save_minutes, and at each new best)."""
    # the data first: a malformed file fails before a checkpoint is downloaded or loaded
    if valid_path is not None:
        train_pairs, valid_pairs = read_pairs(train_path), read_pairs(valid_path)
    else:
        train_pairs, valid_pairs = split_pairs(read_pairs(train_path), valid_fraction, seed, train_path)
    test_pairs = read_pairs(test_path) if test_path is not None else None
    src = resolve_model_dir(model_dir)
    nli = load_nli(src)
    before = accuracy(nli, valid_pairs)
    test_before = accuracy(nli, test_pairs) if test_pairs else None

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
                      eval_every=eval_every or steps_per_epoch, progress=progress, resume=resume,
                      save_minutes=save_minutes)
    # eval_fn: nli.model is net.clf, the weights being trained
    result = train(net, cfg, features, collate, eval_fn=lambda m: accuracy(nli, valid_pairs), export=False)
    if result["best_dir"] is not None:
        load_trainable(net, Path(cfg.out_dir) / result["best_dir"])
    nli.model.eval()
    after = accuracy(nli, valid_pairs)
    saved = save_classifier(nli.model, Path(out_dir) / "model", tokenizer_from=src)
    report = {"train_pairs": len(train_pairs), "valid_pairs": len(valid_pairs), "valid_accuracy_before": before,
              "valid_accuracy_after": after, "steps": result["step"], "model_dir": str(saved)}
    if test_pairs:
        report.update(test_pairs=len(test_pairs), test_accuracy_before=test_before,
                      test_accuracy_after=accuracy(nli, test_pairs))
    write_json(Path(out_dir) / "finetune.json", report)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description="Fine-tune a RoBERTa NLI classifier with dpo.py's training loop on "
                                 "labelled pairs: JSONL {premise, hypothesis, label} or Dialogue NLI's files as "
                                 "distributed (a JSON array of {sentence1, sentence2, label}, label positive|neutral|"
                                 "negative)")
    ap.add_argument("--model", required=True, help="local dir or hub id of a RobertaForSequenceClassification")
    ap.add_argument("--train", required=True, help="training pairs, e.g. dialogue_nli_train.jsonl")
    ap.add_argument("--valid", default=None, help="held-out pairs that pick the best checkpoint, e.g. "
                    "dialogue_nli_dev.jsonl (default: --valid-fraction of --train)")
    ap.add_argument("--valid-fraction", type=float, default=0.1)
    ap.add_argument("--test", default=None, help="pairs only measured, before and after (e.g. "
                    "dialogue_nli_test.jsonl): accuracy on data that chose nothing")
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
                      seed=args.seed, max_steps=args.max_steps, test_path=args.test)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
