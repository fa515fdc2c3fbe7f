"""NLI for PAL's consistency score: a hand-written RoBERTa sequence classifier, C.score, and NLI persona labels.

Read top to bottom:
  1. RobertaConfig      - filled from the checkpoint's config.json, never re-derived
  2. the model          - embeddings (positions start after the padding index), post-LN encoder blocks,
                          the <s>-token classification head (dense -> tanh -> out_proj)
  3. loading / saving   - rename table Hugging Face -> ours, an assert on every shape and on the key set
  4. NLIClassifier      - tokenize pairs, batch with padding, probabilities in a fixed label order; load_nli
  5. c_score            - Madotto et al. (2019)'s C.score; nli_persona_labels - persona labels by entailment

Works with roberta-large-mnli and any RobertaForSequenceClassification checkpoint whose id2label names the
three NLI classes. Fine-tuning one on labelled pairs: extras/nli_finetune.py.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import Example, load_tokenizer
from model import atomic_path, checkpoint_files, resolve_model_dir, write_json

# Our fixed output order of predict(): index 0 contradiction, 1 neutral, 2 entailment.
NLI_LABELS = ("contradiction", "neutral", "entailment")
C_SCORE_VALUE = (-1, 0, 1)  # what each of NLI_LABELS contributes to C.score


# ----------------------------------------------------------------------------------------------------------
# 1. Config

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
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "pad_token_id"):
            if k not in hf:
                raise KeyError(f"{where}: missing key {k!r}")
        kw = {f: hf[f] for f in cls.__dataclass_fields__ if f in hf and f != "id2label"}
        if "id2label" in hf:
            labels = hf["id2label"]
            if not isinstance(labels, dict) or not all(str(k).lstrip("-").isdigit() for k in labels):
                raise ValueError(f"{where}: id2label must map integer ids to names, got {labels!r}")
            kw["id2label"] = {int(k): str(v) for k, v in labels.items()}
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
# 3. Loading and saving Hugging Face checkpoints

# Keys a RobertaForSequenceClassification checkpoint may hold that the classifier does not use: the pooler of
# the pre-trained RobertaModel (roberta-large-mnli ships it) and an old position_ids buffer. Anything else
# unknown is an error.
IGNORED_KEYS = ("roberta.pooler.dense.weight", "roberta.pooler.dense.bias", "roberta.embeddings.position_ids")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def hf_names(cfg: RobertaConfig) -> dict[str, str]:
    """Rename table: our parameter name -> Hugging Face RobertaForSequenceClassification name."""
    names = {"emb.tok.weight": "roberta.embeddings.word_embeddings.weight",
             "emb.pos.weight": "roberta.embeddings.position_embeddings.weight",
             "emb.seg.weight": "roberta.embeddings.token_type_embeddings.weight",
             "emb.ln.weight": "roberta.embeddings.LayerNorm.weight",
             "emb.ln.bias": "roberta.embeddings.LayerNorm.bias"}
    per_block = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
                 "attn.o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
                 "fc1": "intermediate.dense", "fc2": "output.dense", "ln2": "output.LayerNorm"}
    modules = {f"blocks.{i}.{ours}": f"roberta.encoder.layer.{i}.{theirs}"
               for i in range(cfg.num_hidden_layers) for ours, theirs in per_block.items()}
    modules.update({"head.dense": "classifier.dense", "head.out_proj": "classifier.out_proj"})
    for ours, theirs in modules.items():
        for w in ("weight", "bias"):
            names[f"{ours}.{w}"] = f"{theirs}.{w}"
    return names


def read_hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: model.safetensors, sharded safetensors (index json), or pytorch_model.bin."""
    safetensors = [model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"]
    if any(p.exists() for p in safetensors):
        return {k: t for f in checkpoint_files(model_dir) for k, t in load_file(str(f)).items()}
    if (model_dir / "pytorch_model.bin").exists():
        return torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_classifier(model_dir: Path, dtype=torch.float32, device="cpu") -> RobertaClassifier:
    """Build RobertaClassifier from a Hugging Face directory: rename, assert every shape and the key set."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{config}: not found (an NLI model directory needs config.json)")
    cfg = RobertaConfig.from_hf(json.loads(config.read_text(encoding="utf-8")), str(config))
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
    tokenizer files of `tokenizer_from`; atomically (model.atomic_path)."""
    out = Path(out_dir)
    names = hf_names(model.config)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file({names[n]: t.detach().cpu().contiguous() for n, t in model.state_dict().items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", model.config.to_hf())
        for f in TOKENIZER_FILES:
            if tokenizer_from is not None and (Path(tokenizer_from) / f).exists():
                shutil.copy2(Path(tokenizer_from) / f, tmp / f)
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
            (a if len(a) >= len(b) else b).pop()
        cls, sep = ids[0], ids[-1]
        return [cls] + a + [sep, sep] + b + [sep]

    @torch.inference_mode()
    def logits_ids(self, seqs: list[list[int]], batch_size: int = 32, progress: bool | None = None) -> torch.Tensor:
        """Raw logits (N, num_labels) in the checkpoint's order for already-encoded sequences.

        Sequences are sorted by length so each batch pads little, right-padded with <pad>, the mask built from
        the lengths; results come back in input order."""
        cfg = self.model.config
        for i, s in enumerate(seqs):
            if not 0 < len(s) <= cfg.max_tokens:
                raise ValueError(f"sequence {i} has {len(s)} tokens; must be 1..{cfg.max_tokens}")
        out = torch.empty(len(seqs), cfg.num_labels)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        batches = [order[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
        was_training = self.model.training
        self.model.eval()  # dropout off, even when called from inside a training loop
        for idx in tqdm(batches, desc="nli", disable=not (len(seqs) > 2000 if progress is None else progress),
                        dynamic_ncols=True):
            lens = torch.tensor([len(seqs[i]) for i in idx])
            T = int(lens.max())
            ids = torch.full((len(idx), T), cfg.pad_token_id, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
            mask = (torch.arange(T)[None, :] < lens[:, None]).long()  # (B, T) from lengths
            out[idx] = self.model(ids.to(self.device), mask.to(self.device)).float().cpu()
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
        return self.predict_ids([self.encode(p, h) for p, h in zip(premises, hypotheses)], batch_size, progress)


def load_nli(name_or_path, dtype=torch.float32, device="cpu", label_names: list[str] | None = None) -> NLIClassifier:
    """NLIClassifier from a local directory or a hub id (e.g. "roberta-large-mnli", via model.resolve_model_dir).

    The directory needs config.json, the weights (safetensors preferred) and RoBERTa's tokenizer files.
    label_names overrides config.json's id2label when it is generic (LABEL_0, ...)."""
    d = resolve_model_dir(name_or_path)
    model = load_classifier(d, dtype=dtype, device=device)
    tok = load_tokenizer(d)
    if not hasattr(tok, "encode_pair"):
        raise TypeError(f"{d}: tokenizer {type(tok).__name__} has no encode_pair (is this a RoBERTa directory?)")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{d}: tokenizer has {tok.vocab_size} ids but the model's embedding has "
                         f"{model.config.vocab_size} rows")
    return NLIClassifier(model, tok, label_names)


# ----------------------------------------------------------------------------------------------------------
# 5. What PAL asks of NLI: C.score, and persona labels by entailment

def _pairs(responses: list[str], personas_per_response: list[list[str]]) -> list[tuple[int, int, str, str]]:
    """(response index, persona index, premise = the response, hypothesis = the persona sentence) for every
    persona sentence of every response: "u entails p_j", as Madotto et al. and Dialogue NLI pair them."""
    for i, personas in enumerate(personas_per_response):
        if isinstance(personas, str):
            raise TypeError(f"personas_per_response[{i}] must be a list of persona sentences, got a str")
    return [(i, j, r, p) for i, (r, ps) in enumerate(zip(responses, personas_per_response)) for j, p in enumerate(ps)]


def _entailment_probs(nli_predict, pairs: list[tuple[int, int, str, str]], **kw) -> torch.Tensor:
    """nli_predict on the pairs' (premise, hypothesis) texts -> probs (N, 3) (contradiction, neutral, entailment)."""
    probs = torch.as_tensor(nli_predict([p[2] for p in pairs], [p[3] for p in pairs], **kw), dtype=torch.float32)
    if probs.shape != (len(pairs), 3):
        raise ValueError(f"the NLI classifier returned shape {tuple(probs.shape)}, expected ({len(pairs)}, 3)")
    return probs


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
    pairs = _pairs(responses, personas_per_response)
    per_response = [0.0] * len(responses)
    if pairs:  # one call for all pairs: the classifier batches (and sorts by length) itself
        values = torch.tensor(C_SCORE_VALUE, dtype=torch.float64)[
            _entailment_probs(nli.predict, pairs, batch_size=batch_size).argmax(dim=-1)]
        for (i, _, _, _), v in zip(pairs, values.tolist()):
            per_response[i] += v
    score = math.fsum(per_response) / len(responses) if responses else 0.0
    return (score, per_response) if return_per_response else score


def nli_persona_labels(examples: list[Example], nli_predict, threshold: float = 0.5,
                       batch_size: int = 64) -> list[int | None]:
    """Persona labels by NLI entailment: premise = the response, hypothesis = each persona sentence.

    nli_predict(premises: list[str], hypotheses: list[str]) -> probs (N, 3) ordered (contradiction, neutral,
    entailment), e.g. NLIClassifier.predict, called on batch_size pairs at a time. The label is the persona with
    the highest entailment probability if that probability is >= threshold, else None. Apply the labels with
    data.relabel(examples, labels)."""
    pairs = _pairs([e.response for e in examples], [e.personas for e in examples])
    entail = [e for s in range(0, len(pairs), batch_size)
              for e in _entailment_probs(nli_predict, pairs[s:s + batch_size])[:, 2].tolist()]
    labels: list[int | None] = [None] * len(examples)
    best = [threshold] * len(examples)
    for (k, i, _, _), e in zip(pairs, entail):
        if e >= best[k] and (labels[k] is None or e > best[k]):  # strict > keeps the lower index on ties
            labels[k], best[k] = i, e
    return labels


def main(argv=None):
    ap = argparse.ArgumentParser(description="RoBERTa NLI for PAL: probabilities for one (premise, hypothesis) "
                                 "pair. Fine-tuning: python extras/nli_finetune.py")
    ap.add_argument("--model", required=True, help="local dir or hub id of a RobertaForSequenceClassification")
    ap.add_argument("--premise", required=True)
    ap.add_argument("--hypothesis", required=True)
    args = ap.parse_args(argv)
    probs = load_nli(args.model).predict([args.premise], [args.hypothesis])[0]
    print(json.dumps({name: round(p, 4) for name, p in zip(NLI_LABELS, probs.tolist())}))


if __name__ == "__main__":
    sys.exit(main())
