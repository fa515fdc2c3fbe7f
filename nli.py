"""NLI for PAL's consistency score: a hand-written RoBERTa sequence classifier and C.score.

Read top to bottom:
  1. RobertaConfig          - filled from the checkpoint's config.json, never re-derived
  2. the model              - embeddings (positions start after the padding index), post-LN encoder blocks,
                              the <s>-token classification head (dense -> tanh -> out_proj)
  3. loading                - rename table Hugging Face -> ours, an assert on every shape and on the key set
  4. NLIClassifier          - tokenize pairs, batch with padding, probabilities in a fixed label order
  5. c_score                - Madotto et al. (2019)'s C.score
  6. fine-tuning + CLI      - `python nli.py finetune ...` with dpo.py's training loop

Works with roberta-large-mnli and any RobertaForSequenceClassification checkpoint whose id2label names the
three NLI classes. Runtime imports: torch, safetensors, tqdm (+ data.py for the tokenizer, model.py to resolve
hub ids, dpo.py for fine-tuning), all lazily where they are only needed by one path.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Our fixed output order of predict(): index 0 contradiction, 1 neutral, 2 entailment.
NLI_LABELS = ("contradiction", "neutral", "entailment")
C_SCORE_VALUE = (-1, 0, 1)  # what each of NLI_LABELS contributes to C.score


# ----------------------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RobertaConfig:
    """Hyper-parameters of a RoBERTa classifier, named as in Hugging Face's config.json. Defaults are
    roberta-large-mnli's."""
    vocab_size: int = 50265
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514  # 512 tokens + padding_idx + 1: positions start at pad_token_id + 1
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None  # None: hidden_dropout_prob
    id2label: dict[int, str] = field(default_factory=lambda: {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"})

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def max_tokens(self) -> int:
        """Longest input: the position table has pad_token_id + 1 rows before the first real position."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "RobertaConfig":
        if hf.get("model_type") not in ("roberta", None):
            raise ValueError(f"{where}: model_type is {hf.get('model_type')!r}, expected 'roberta'")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{where}: position_embedding_type {hf['position_embedding_type']!r} is not supported "
                             "(only 'absolute')")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ValueError(f"{where}: a decoder RoBERTa is not an NLI classifier")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "pad_token_id")
        for k in required:
            if k not in hf:
                raise KeyError(f"{where}: missing key {k!r}")
        kw = {f: hf[f] for f in cls.__dataclass_fields__ if f in hf and f != "id2label"}
        if "id2label" in hf:
            try:
                kw["id2label"] = {int(k): str(v) for k, v in hf["id2label"].items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"{where}: id2label must map integer ids to names, got {hf['id2label']!r}") from None
        elif "num_labels" in hf:
            kw["id2label"] = {i: f"LABEL_{i}" for i in range(int(hf["num_labels"]))}
        else:
            raise KeyError(f"{where}: neither 'id2label' nor 'num_labels': cannot size the classification head")
        cfg = cls(**kw)
        if sorted(cfg.id2label) != list(range(cfg.num_labels)):
            raise ValueError(f"{where}: id2label keys must be 0..{cfg.num_labels - 1}, got {sorted(cfg.id2label)}")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"{where}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                             f"{cfg.num_attention_heads}")
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {cfg.hidden_act!r} not supported ({sorted(_ACTIVATIONS)})")
        return cfg

    def to_hf(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "id2label"}
        d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        d["label2id"] = {v: k for k, v in self.id2label.items()}
        d.update(model_type="roberta", architectures=["RobertaForSequenceClassification"],
                 position_embedding_type="absolute", bos_token_id=0, eos_token_id=2)
        return d


_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact erf GELU: RoBERTa's
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# ----------------------------------------------------------------------------------------------------------
# 2. The model
# ----------------------------------------------------------------------------------------------------------


class Embeddings(nn.Module):
    """token + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.pad = cfg.pad_token_id
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.seg = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)  # token types ("segments"); RoBERTa has 1
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, mask, token_type_ids=None):
        # fairseq's positions: real tokens are numbered pad+1, pad+2, ... (RoBERTa never uses rows 0..pad);
        # padding gets row `pad`. Same numbers as HF's create_position_ids_from_input_ids on right-padded rows.
        positions = torch.cumsum(mask, dim=1) * mask + self.pad  # (B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # RoBERTa has one segment type
        x = self.tok(input_ids) + self.seg(token_type_ids) + self.pos(positions)  # (B, T, C)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        c = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q, self.k, self.v, self.o = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, bias):
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for lin in (self.q, self.k, self.v))
        # bias (B, 1, 1, T): 0 on real keys, the dtype's minimum on padding (no -inf: no NaN rows)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout_p if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Post-LN transformer block (BERT/RoBERTa): x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, bias):
        x = self.ln1(x + self.drop(self.attn(x, bias)))
        return self.ln2(x + self.drop(self.fc2(self.act(self.fc1(x)))))


class ClassificationHead(nn.Module):
    """On the <s> token's final state: dropout -> dense -> tanh -> dropout -> out_proj (RoBERTa's head)."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        self.drop = nn.Dropout(p)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, h):
        x = h[:, 0]  # (B, C): the <s> token
        x = torch.tanh(self.dense(self.drop(x)))
        return self.out_proj(self.drop(x))  # (B, num_labels)


class RobertaClassifier(nn.Module):
    """RoBERTa encoder + sequence-classification head. Logits are in the checkpoint's own label order
    (config.id2label); NLIClassifier reorders them."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.config = cfg
        self.emb = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.head = ClassificationHead(cfg)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T) right-padded; attention_mask (B, T) 1 on real tokens (None: all real).
        Returns logits (B, num_labels)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.long()
        x = self.emb(input_ids, mask, token_type_ids)
        dtype = x.dtype
        bias = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, bias)
        return self.head(x)


# ----------------------------------------------------------------------------------------------------------
# 3. Loading Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------------------

# Keys a RobertaForSequenceClassification checkpoint may hold that the classifier does not use: the pooler of
# the pre-trained RobertaModel (roberta-large-mnli ships it) and an old position_ids buffer. Anything else
# unknown is an error.
IGNORED_KEYS = ("roberta.pooler.dense.weight", "roberta.pooler.dense.bias", "roberta.embeddings.position_ids")


def hf_names(cfg: RobertaConfig) -> dict[str, str]:
    """Rename table: our parameter name -> Hugging Face RobertaForSequenceClassification name."""
    names = {
        "emb.tok.weight": "roberta.embeddings.word_embeddings.weight",
        "emb.pos.weight": "roberta.embeddings.position_embeddings.weight",
        "emb.seg.weight": "roberta.embeddings.token_type_embeddings.weight",
        "emb.ln.weight": "roberta.embeddings.LayerNorm.weight",
        "emb.ln.bias": "roberta.embeddings.LayerNorm.bias",
    }
    per_block = {
        "attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
        "attn.o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
        "fc1": "intermediate.dense", "fc2": "output.dense", "ln2": "output.LayerNorm",
    }
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in per_block.items():
            for w in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{w}"] = f"roberta.encoder.layer.{i}.{theirs}.{w}"
    for ours, theirs in (("head.dense", "classifier.dense"), ("head.out_proj", "classifier.out_proj")):
        for w in ("weight", "bias"):
            names[f"{ours}.{w}"] = f"{theirs}.{w}"
    return names


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (an NLI model directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def read_hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: model.safetensors, sharded safetensors (index json), or pytorch_model.bin."""
    from safetensors.torch import load_file

    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        sd = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            sd.update(load_file(str(model_dir / shard)))
        return sd
    if (model_dir / "pytorch_model.bin").exists():
        return torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_classifier(model_dir: Path, dtype=torch.float32, device="cpu") -> RobertaClassifier:
    """Build RobertaClassifier from a Hugging Face directory: rename, assert every shape and the key set."""
    model_dir = Path(model_dir)
    cfg = RobertaConfig.from_hf(_read_json(model_dir / "config.json"), str(model_dir / "config.json"))
    sd = read_hf_state_dict(model_dir)
    names = hf_names(cfg)
    with torch.device("meta"):  # no random init of weights that are overwritten next (gpt-fast's trick)
        model = RobertaClassifier(cfg)
    expected = {n: p.shape for n, p in model.state_dict().items()}
    assert set(expected) == set(names), "rename table out of date with the module tree"
    missing = [names[n] for n in expected if names[n] not in sd]
    unknown = sorted(set(sd) - set(names.values()) - set(IGNORED_KEYS))
    if missing or unknown:
        raise KeyError(f"{model_dir}: checkpoint does not match a RobertaForSequenceClassification of its config: "
                       f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, unexpected {unknown[:6]}"
                       f"{' ...' if len(unknown) > 6 else ''}")
    ours = {}
    for n, shape in expected.items():
        t = sd[names[n]]
        if t.shape != shape:
            raise ValueError(f"{model_dir}: {names[n]} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}")
        ours[n] = t.to(device=device, dtype=dtype)
    model.load_state_dict(ours, strict=True, assign=True)
    return model.eval()


def save_classifier(model: RobertaClassifier, out_dir, tokenizer_from: Path | None = None) -> Path:
    """Write config.json + model.safetensors in Hugging Face's layout (transformers loads it as is), plus the
    tokenizer files of `tokenizer_from`; atomic (tmp dir, then rename)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = hf_names(model.config)
    save_file({names[n]: t.detach().cpu().contiguous() for n, t in model.state_dict().items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2), encoding="utf-8")
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
            if (Path(tokenizer_from) / f).exists():
                shutil.copy2(Path(tokenizer_from) / f, tmp / f)
    old = out.with_name(f".old-{out.name}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def label_order(id2label: dict[int, str], where: str = "config.json") -> list[int]:
    """Checkpoint label ids of (contradiction, neutral, entailment), found by name (case-insensitive)."""
    by_name = {}
    for i, name in id2label.items():
        key = str(name).strip().lower()
        if key in by_name:
            raise ValueError(f"{where}: label {name!r} appears twice in id2label {id2label}")
        by_name[key] = i
    missing = [n for n in NLI_LABELS if n not in by_name]
    if missing or len(id2label) != 3:
        raise ValueError(f"{where}: id2label {id2label} does not name the three NLI classes {NLI_LABELS} "
                         f"(missing {missing}); pass label_names=[name of id 0, id 1, id 2] to load_nli")
    return [by_name[n] for n in NLI_LABELS]


# ----------------------------------------------------------------------------------------------------------
# 4. The classifier as used in evaluation
# ----------------------------------------------------------------------------------------------------------


class NLIClassifier:
    """A RobertaClassifier + its tokenizer. predict() returns probabilities ordered (contradiction, neutral,
    entailment) whatever the checkpoint's own order."""

    def __init__(self, model: RobertaClassifier, tokenizer=None, label_names: list[str] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer  # needs encode_pair(a, b) and encode(text); None: use predict_ids only
        if label_names is not None and len(label_names) != model.config.num_labels:
            raise ValueError(f"label_names has {len(label_names)} names, the model has "
                             f"{model.config.num_labels} labels")
        id2label = dict(enumerate(label_names)) if label_names is not None else model.config.id2label
        self.order = label_order(id2label)  # probs_ours[:, k] = probs_checkpoint[:, order[k]]

    @property
    def device(self):
        return next(self.model.parameters()).device

    def encode(self, premise: str, hypothesis: str) -> list[int]:
        """<s> premise </s></s> hypothesis </s>; over-long pairs are cut longest-first, keeping the specials."""
        if self.tokenizer is None:
            raise RuntimeError("NLIClassifier has no tokenizer (load it with load_nli, or call predict_ids)")
        ids = self.tokenizer.encode_pair(premise, hypothesis)
        limit = self.model.config.max_tokens
        if len(ids) <= limit:
            return ids
        a, b = self.tokenizer.encode(premise), self.tokenizer.encode(hypothesis)
        while len(a) + len(b) + 4 > limit:  # 4 specials: <s> </s> </s> </s>
            if len(a) >= len(b):
                a.pop()
            else:
                b.pop()
        cls, sep = ids[0], ids[-1]
        return [cls] + a + [sep, sep] + b + [sep]

    @torch.inference_mode()
    def logits_ids(self, seqs: list[list[int]], batch_size: int = 32, progress: bool | None = None) -> torch.Tensor:
        """Raw logits (N, num_labels) in the checkpoint's order for already-encoded sequences.

        Sequences are sorted by length so each batch pads little, right-padded with <pad>, the mask built from
        the lengths; results come back in input order."""
        cfg = self.model.config
        n = len(seqs)
        out = torch.empty(n, cfg.num_labels)
        order = sorted(range(n), key=lambda i: -len(seqs[i]))
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        if progress is None:
            progress = n > 2000
        from tqdm import tqdm

        was_training = self.model.training
        self.model.eval()  # dropout off, even when called from inside a training loop
        for idx in tqdm(batches, desc="nli", disable=not progress, dynamic_ncols=True):
            lens = [len(seqs[i]) for i in idx]
            if min(lens) == 0 or max(lens) > cfg.max_tokens:
                bad = next(i for i in idx if not 0 < len(seqs[i]) <= cfg.max_tokens)
                raise ValueError(f"sequence {bad} has {len(seqs[bad])} tokens; must be 1..{cfg.max_tokens}")
            T = max(lens)
            ids = torch.full((len(idx), T), cfg.pad_token_id, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :lens[row]] = torch.tensor(seqs[i])
            mask = (torch.arange(T)[None, :] < torch.tensor(lens)[:, None]).long()  # (B, T) from lengths
            logits = self.model(ids.to(self.device), mask.to(self.device))
            out[idx] = logits.float().cpu()
        self.model.train(was_training)
        return out

    def predict_ids(self, seqs: list[list[int]], batch_size: int = 32, progress: bool | None = None) -> torch.Tensor:
        """Probabilities (N, 3) ordered (contradiction, neutral, entailment) for encoded pairs."""
        return torch.softmax(self.logits_ids(seqs, batch_size, progress), dim=-1)[:, self.order]

    def predict(self, premises: list[str], hypotheses: list[str], batch_size: int = 32,
                progress: bool | None = None) -> torch.Tensor:
        """Probabilities (N, 3) ordered (contradiction, neutral, entailment) that premise i entails / is
        neutral to / contradicts hypothesis i."""
        if len(premises) != len(hypotheses):
            raise ValueError(f"{len(premises)} premises but {len(hypotheses)} hypotheses")
        seqs = [self.encode(p, h) for p, h in zip(premises, hypotheses)]
        return self.predict_ids(seqs, batch_size, progress)


def _resolve(name_or_path) -> Path:
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    from model import resolve_model_dir  # lazy: hub ids only

    return Path(resolve_model_dir(name_or_path))


def load_nli(name_or_path, dtype=torch.float32, device="cpu", label_names: list[str] | None = None) -> NLIClassifier:
    """NLIClassifier from a local directory or a hub id (e.g. "roberta-large-mnli", via model.resolve_model_dir).

    The directory needs config.json, the weights (safetensors preferred) and RoBERTa's tokenizer files.
    label_names overrides config.json's id2label when it is generic (LABEL_0, ...)."""
    d = _resolve(name_or_path)
    model = load_classifier(d, dtype=dtype, device=device)
    from data import load_tokenizer  # lazy: only the text path needs it

    tok = load_tokenizer(d)
    if not hasattr(tok, "encode_pair"):
        raise TypeError(f"{d}: tokenizer {type(tok).__name__} has no encode_pair (is this a RoBERTa directory?)")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{d}: tokenizer has {tok.vocab_size} ids but the model's embedding has "
                         f"{model.config.vocab_size} rows")
    return NLIClassifier(model, tok, label_names)


# ----------------------------------------------------------------------------------------------------------
# 5. C.score
# ----------------------------------------------------------------------------------------------------------


def c_score(responses: list[str], personas_per_response: list[list[str]], nli, batch_size: int = 64,
            return_per_response: bool = False):
    """C.score of Madotto et al. (2019), "Personalizing Dialogue Agents via Meta-Learning":

        NLI(u, p_j) = +1 if u entails p_j, 0 if neutral, -1 if u contradicts p_j   (argmax of the classifier)
        C(u) = sum_j NLI(u, p_j)   over the persona sentences p_1..p_m given with response u
        C.score = mean of C(u) over the responses

    Premise = the generated response u, hypothesis = the persona sentence p_j ("u entails p_j"), the
    direction of the paper's definition and of Dialogue NLI (utterance, persona-sentence) pairs.
    Note C(u) is a sum, so its range grows with the number of persona sentences (-m..m).

    `nli` is anything with predict(premises, hypotheses, batch_size=...) -> probs (N, 3) ordered
    (contradiction, neutral, entailment), e.g. load_nli(...).
    """
    if nli is None:
        raise ValueError("c_score needs an NLI classifier; without one report C.score as unavailable "
                         "(metrics.persona_coverage is the model-free persona score)")
    if len(responses) != len(personas_per_response):
        raise ValueError(f"{len(responses)} responses but {len(personas_per_response)} persona lists")
    premises, hypotheses, owner = [], [], []
    for i, (resp, personas) in enumerate(zip(responses, personas_per_response)):
        if isinstance(personas, str):
            raise TypeError(f"personas_per_response[{i}] must be a list of persona sentences, got a str")
        for p in personas:
            premises.append(resp)
            hypotheses.append(p)
            owner.append(i)
    per_response = [0.0] * len(responses)
    if premises:
        probs = torch.as_tensor(nli.predict(premises, hypotheses, batch_size=batch_size))
        if probs.shape != (len(premises), 3):
            raise ValueError(f"nli.predict returned shape {tuple(probs.shape)}, expected ({len(premises)}, 3)")
        values = torch.tensor(C_SCORE_VALUE, dtype=torch.float64)[probs.argmax(dim=-1)]
        for i, v in zip(owner, values.tolist()):
            per_response[i] += v
    score = math.fsum(per_response) / len(responses) if responses else 0.0
    return (score, per_response) if return_per_response else score


# ----------------------------------------------------------------------------------------------------------
# 6. Fine-tuning on (premise, hypothesis, label) pairs with dpo.py's loop
# ----------------------------------------------------------------------------------------------------------


class ClassifierAsLM(nn.Module):
    """Presents the classifier to dpo.train's SFT mode, which maximizes summed label log-probs of a causal LM:
    logits (B, 2, L) whose position 0 holds the class logits and labels (B, 2) = [-100, y]. After dpo.py's
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


def finetune(model_dir, train_path, out_dir, valid_path=None, valid_fraction: float = 0.1, epochs: float = 1.0,
             lr: float = 1e-5, batch_size: int = 16, eval_every: int = 0, seed: int = 0, max_steps=None,
             progress: bool = True) -> dict:
    """Fine-tune an NLI classifier with dpo.train (mode "sft" on ClassifierAsLM); keep the weights with the best
    held-out accuracy; save them (HF layout + tokenizer files) to out_dir/model. Returns accuracies."""
    from dpo import TrainConfig, load_trainable, train

    nli = load_nli(model_dir)
    src = _resolve(model_dir)
    pairs = read_pairs(train_path)
    if valid_path is not None:
        train_pairs, valid_pairs = pairs, read_pairs(valid_path)
    else:
        shuffled = pairs[:]
        random.Random(seed).shuffle(shuffled)
        k = max(1, round(len(shuffled) * valid_fraction))
        if k >= len(shuffled):
            raise ValueError(f"{train_path}: {len(shuffled)} pairs are too few to hold out {k}")
        valid_pairs, train_pairs = shuffled[:k], shuffled[k:]
    before = accuracy(nli, valid_pairs)

    pad = nli.model.config.pad_token_id
    # labels in the checkpoint's own index space, so the saved model keeps its id2label
    features = [{"input_ids": nli.encode(p, h), "labels": [-100, nli.order[y]]} for p, h, y in train_pairs]

    def collate(batch: list[dict]) -> dict:
        T = max(len(f["input_ids"]) for f in batch)
        ids = torch.tensor([f["input_ids"] + [pad] * (T - len(f["input_ids"])) for f in batch])
        return {"input_ids": ids, "labels": torch.tensor([f["labels"] for f in batch])}

    net = ClassifierAsLM(nli.model)

    def eval_fn(m) -> float:
        return accuracy(nli, valid_pairs)  # nli.model is m.clf: the weights being trained

    steps_per_epoch = max(1, len(features) // batch_size)
    cfg = TrainConfig(mode="sft", out_dir=str(Path(out_dir) / "train"), batch_size=batch_size, lr=lr, epochs=epochs,
                      max_steps=max_steps, seed=seed, warmup_steps=min(100, steps_per_epoch // 10),
                      eval_every=eval_every or steps_per_epoch, progress=progress)
    result = train(net, cfg, features, collate, eval_fn=eval_fn, export=False)
    if result["best_dir"] is not None:
        load_trainable(net, Path(cfg.out_dir) / result["best_dir"])
    nli.model.eval()
    after = accuracy(nli, valid_pairs)
    saved = save_classifier(nli.model, Path(out_dir) / "model", tokenizer_from=src)
    report = {"train_pairs": len(train_pairs), "valid_pairs": len(valid_pairs), "valid_accuracy_before": before,
              "valid_accuracy_after": after, "steps": result["step"], "model_dir": str(saved)}
    tmp = Path(out_dir) / ".tmp-finetune.json"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, Path(out_dir) / "finetune.json")
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description="RoBERTa NLI for PAL: predict, or fine-tune on labelled pairs")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ft = sub.add_parser("finetune", help="fine-tune on JSONL {premise, hypothesis, label} pairs")
    ft.add_argument("--model", required=True, help="local dir or hub id of a RobertaForSequenceClassification")
    ft.add_argument("--train", required=True, help="JSONL training pairs")
    ft.add_argument("--valid", default=None, help="JSONL held-out pairs (default: --valid-fraction of --train)")
    ft.add_argument("--valid-fraction", type=float, default=0.1)
    ft.add_argument("--out", required=True, help="output directory (model/ in HF layout, train/, finetune.json)")
    ft.add_argument("--epochs", type=float, default=1.0)
    ft.add_argument("--max-steps", type=int, default=None)
    ft.add_argument("--lr", type=float, default=1e-5)
    ft.add_argument("--batch-size", type=int, default=16)
    ft.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: each epoch)")
    ft.add_argument("--seed", type=int, default=0)
    pr = sub.add_parser("predict", help="probabilities for one pair")
    pr.add_argument("--model", required=True)
    pr.add_argument("--premise", required=True)
    pr.add_argument("--hypothesis", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "finetune":
        report = finetune(args.model, args.train, args.out, valid_path=args.valid, valid_fraction=args.valid_fraction,
                          epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, eval_every=args.eval_every,
                          seed=args.seed, max_steps=args.max_steps)
        print(json.dumps(report, indent=2))
    else:
        probs = load_nli(args.model).predict([args.premise], [args.hypothesis])[0]
        print(json.dumps({name: round(p, 4) for name, p in zip(NLI_LABELS, probs.tolist())}))


if __name__ == "__main__":
    sys.exit(main())
