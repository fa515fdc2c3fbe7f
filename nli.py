"""NLI for PAL's consistency score: 1. RobertaConfig from config.json; 2. a hand-written RoBERTa classifier;
3. loading Hugging Face checkpoints (saving one: extras/nli_finetune.py); 4. NLIClassifier (pairs -> probabilities
in a fixed label order); 5. what PAL asks of it: C.score and persona labels by entailment.

Works with roberta-large-mnli and any RobertaForSequenceClassification checkpoint whose id2label names the
three NLI classes. Fine-tuning one on labelled pairs: extras/nli_finetune.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import Example, load_tokenizer
from infra.files import read_json
from infra.hub import read_all_tensors, resolve_model_dir

# Our fixed output order of predict(): index 0 contradiction, 1 neutral, 2 entailment.
NLI_LABELS = ("contradiction", "neutral", "entailment")
C_SCORE_VALUE = (-1, 0, 1)  # what each of NLI_LABELS contributes to C.score
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "pad_token_id")


def _require(ok: bool, message: str, error: type[Exception] = ValueError):
    """Raise error(message) unless ok: the checks on checkpoints and inputs, one line each."""
    if not ok:
        raise error(message)


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
        _require(hf.get("model_type") in ("roberta", None),
                 f"{where}: model_type is {hf.get('model_type')!r}, expected 'roberta'")
        _require(hf.get("position_embedding_type", "absolute") == "absolute",
                 f"{where}: position_embedding_type {hf.get('position_embedding_type')!r} is not supported")
        _require(not (hf.get("is_decoder") or hf.get("add_cross_attention")),
                 f"{where}: a decoder RoBERTa is not an NLI classifier")
        for k in REQUIRED_KEYS:
            _require(k in hf, f"{where}: missing key {k!r}", KeyError)
        _require("id2label" in hf or "num_labels" in hf,
                 f"{where}: neither 'id2label' nor 'num_labels': cannot size the classification head", KeyError)
        labels = hf["id2label"] if "id2label" in hf else {i: f"LABEL_{i}" for i in range(int(hf["num_labels"]))}
        _require(isinstance(labels, dict) and all(str(k).lstrip("-").isdigit() for k in labels),
                 f"{where}: id2label must map integer ids to names, got {labels!r}")
        cfg = cls(**{f: hf[f] for f in cls.__dataclass_fields__ if f in hf and f != "id2label"},
                  id2label={int(k): str(v) for k, v in labels.items()})
        _require(sorted(cfg.id2label) == list(range(cfg.num_labels)),
                 f"{where}: id2label keys must be 0..{cfg.num_labels - 1}, got {sorted(cfg.id2label)}")
        _require(cfg.hidden_size % cfg.num_attention_heads == 0, f"{where}: hidden_size {cfg.hidden_size} is "
                 f"not a multiple of num_attention_heads {cfg.num_attention_heads}")
        _require(cfg.hidden_act in _ACTIVATIONS,
                 f"{where}: hidden_act {cfg.hidden_act!r} not supported ({sorted(_ACTIVATIONS)})")
        return cfg


_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu,  # F.gelu: the exact erf GELU, RoBERTa's
                **dict.fromkeys(("gelu_new", "gelu_pytorch_tanh"), lambda x: F.gelu(x, approximate="tanh"))}


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
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids  # RoBERTa has one type
        x = self.tok(input_ids) + self.seg(types) + self.pos(positions)  # (B, T, C)
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
        self.drop = nn.Dropout(cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout)
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
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, bias)
        return self.head(x)


# ----------------------------------------------------------------------------------------------------------
# 3. Loading Hugging Face checkpoints

# Checkpoint keys the classifier does not use: the pretrained RobertaModel's pooler (roberta-large-mnli ships
# it) and an old position_ids buffer. Any other unknown key is an error.
IGNORED_KEYS = ("roberta.pooler.dense.weight", "roberta.pooler.dense.bias", "roberta.embeddings.position_ids")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def hf_names(cfg: RobertaConfig) -> dict[str, str]:
    """Rename table: our parameter name -> Hugging Face RobertaForSequenceClassification name."""
    modules = {"emb.tok": "roberta.embeddings.word_embeddings", "emb.pos": "roberta.embeddings.position_embeddings",
               "emb.seg": "roberta.embeddings.token_type_embeddings", "emb.ln": "roberta.embeddings.LayerNorm",
               "head.dense": "classifier.dense", "head.out_proj": "classifier.out_proj"}
    per_block = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
                 "attn.o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
                 "fc1": "intermediate.dense", "fc2": "output.dense", "ln2": "output.LayerNorm"}
    modules.update({f"blocks.{i}.{ours}": f"roberta.encoder.layer.{i}.{theirs}"
                    for i in range(cfg.num_hidden_layers) for ours, theirs in per_block.items()})
    return {f"{ours}.{w}": f"{theirs}.{w}" for ours, theirs in modules.items()
            for w in (("weight",) if theirs.endswith("_embeddings") else ("weight", "bias"))}  # embeddings: no bias


def load_classifier(model_dir: Path, dtype=torch.float32, device="cpu") -> RobertaClassifier:
    """Build RobertaClassifier from a Hugging Face directory: rename, assert every shape and the key set."""
    config = Path(model_dir) / "config.json"
    _require(config.exists(), f"{config}: not found (an NLI model directory needs config.json)", FileNotFoundError)
    cfg = RobertaConfig.from_hf(read_json(config), str(config))
    sd, names = read_all_tensors(Path(model_dir)), hf_names(cfg)
    with torch.device("meta"):  # no random init of weights that are overwritten next (gpt-fast's trick)
        model = RobertaClassifier(cfg)
    expected = {n: p.shape for n, p in model.state_dict().items()}
    assert set(expected) == set(names), "rename table out of date with the module tree"
    missing = [names[n] for n in expected if names[n] not in sd]
    unknown = sorted(set(sd) - set(names.values()) - set(IGNORED_KEYS))
    _require(not (missing or unknown), f"{model_dir}: checkpoint does not match a RobertaForSequenceClassification "
             f"of its config: missing {len(missing)} {missing[:6]}, unexpected {len(unknown)} {unknown[:6]}", KeyError)
    for n, shape in expected.items():
        _require(sd[names[n]].shape == shape, f"{model_dir}: {names[n]} has shape {tuple(sd[names[n]].shape)}, "
                 f"config.json implies {tuple(shape)}")
    model.load_state_dict({n: sd[names[n]].to(device=device, dtype=dtype) for n in expected}, strict=True, assign=True)
    return model.eval()


def label_order(id2label: dict[int, str], where: str = "config.json") -> list[int]:
    """Checkpoint label ids of (contradiction, neutral, entailment), found by name (case-insensitive)."""
    by_name = {str(name).strip().lower(): i for i, name in id2label.items()}
    _require(len(by_name) == len(id2label), f"{where}: a label name appears twice in id2label {id2label}")
    missing = [n for n in NLI_LABELS if n not in by_name]
    _require(not missing and len(id2label) == 3, f"{where}: id2label {id2label} does not name the three NLI "
             f"classes {NLI_LABELS} (missing {missing}); pass label_names=[name of id 0, id 1, id 2] to load_nli")
    return [by_name[n] for n in NLI_LABELS]


# ----------------------------------------------------------------------------------------------------------
# 4. The classifier as used in evaluation

class NLIClassifier:
    """A RobertaClassifier + its tokenizer. predict() returns probabilities ordered (contradiction, neutral,
    entailment) whatever the checkpoint's own order."""

    def __init__(self, model: RobertaClassifier, tokenizer=None, label_names: list[str] | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer  # needs encode_pair(a, b) and encode(text); None: use predict_ids only
        _require(label_names is None or len(label_names) == model.config.num_labels,
                 f"label_names has {len(label_names or [])} names, the model has {model.config.num_labels} labels")
        id2label = dict(enumerate(label_names)) if label_names is not None else model.config.id2label
        self.order = label_order(id2label)  # probs_ours[:, k] = probs_checkpoint[:, order[k]]

    def encode(self, premise: str, hypothesis: str) -> list[int]:
        """<s> premise </s></s> hypothesis </s>; over-long pairs are cut longest-first, keeping the specials."""
        _require(self.tokenizer is not None, "NLIClassifier has no tokenizer (load it with load_nli, or call "
                 "predict_ids)", RuntimeError)
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
        """Raw logits (N, num_labels) in the checkpoint's order for encoded sequences, in input order. Batches
        take sequences sorted by length (little padding), right-padded with <pad>, the mask built from lengths."""
        cfg, device = self.model.config, next(self.model.parameters()).device
        for i, s in enumerate(seqs):
            _require(0 < len(s) <= cfg.max_tokens, f"sequence {i} has {len(s)} tokens; must be 1..{cfg.max_tokens}")
        out = torch.empty(len(seqs), cfg.num_labels)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        batches = [order[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
        was_training = self.model.training
        self.model.eval()  # dropout off, even when called from inside a training loop
        for idx in tqdm(batches, desc="nli", disable=not (len(seqs) > 2000 if progress is None else progress),
                        dynamic_ncols=True):
            lens = torch.tensor([len(seqs[i]) for i in idx])
            T = int(lens.max())
            ids = torch.tensor([seqs[i] + [cfg.pad_token_id] * (T - len(seqs[i])) for i in idx])  # (B, T)
            mask = (torch.arange(T)[None, :] < lens[:, None]).long()  # (B, T) from lengths
            out[idx] = self.model(ids.to(device), mask.to(device)).float().cpu()
        self.model.train(was_training)
        return out

    def predict_ids(self, seqs: list[list[int]], batch_size: int = 32, progress: bool | None = None) -> torch.Tensor:
        """Probabilities (N, 3) ordered (contradiction, neutral, entailment) for encoded pairs."""
        return torch.softmax(self.logits_ids(seqs, batch_size, progress), dim=-1)[:, self.order]

    def predict(self, premises: list[str], hypotheses: list[str], batch_size: int = 32,
                progress: bool | None = None) -> torch.Tensor:
        """Probabilities (N, 3) that premise i contradicts / is neutral to / entails hypothesis i."""
        _require(len(premises) == len(hypotheses), f"{len(premises)} premises but {len(hypotheses)} hypotheses")
        return self.predict_ids([self.encode(p, h) for p, h in zip(premises, hypotheses)], batch_size, progress)


def load_nli(name_or_path, dtype=torch.float32, device="cpu", label_names: list[str] | None = None) -> NLIClassifier:
    """NLIClassifier from a local directory or a hub id (e.g. "roberta-large-mnli", via infra.hub.resolve_model_dir)
    holding config.json, the weights and RoBERTa's tokenizer files. label_names overrides config.json's
    id2label when it is generic (LABEL_0, ...)."""
    d = resolve_model_dir(name_or_path)
    model = load_classifier(d, dtype=dtype, device=device)
    tok = load_tokenizer(d)
    _require(hasattr(tok, "encode_pair"),
             f"{d}: tokenizer {type(tok).__name__} has no encode_pair (is this a RoBERTa directory?)", TypeError)
    _require(tok.vocab_size <= model.config.vocab_size,
             f"{d}: tokenizer has {tok.vocab_size} ids but the model's embedding has {model.config.vocab_size} rows")
    return NLIClassifier(model, tok, label_names)


# ----------------------------------------------------------------------------------------------------------
# 5. What PAL asks of NLI: C.score, and persona labels by entailment

def _pairs(responses: list[str], personas_per_response: list[list[str]]) -> list[tuple[int, int, str, str]]:
    """(response index, persona index, response, persona sentence) for every persona sentence of every
    response. Which of the two texts is the premise is each caller's choice, written at its call."""
    for i, personas in enumerate(personas_per_response):
        _require(not isinstance(personas, str),
                 f"personas_per_response[{i}] must be a list of persona sentences, got a str", TypeError)
    return [(i, j, r, p) for i, (r, ps) in enumerate(zip(responses, personas_per_response)) for j, p in enumerate(ps)]


def _entailment_probs(nli_predict, premises: list[str], hypotheses: list[str], **kw) -> torch.Tensor:
    """nli_predict(premises, hypotheses) -> probs (N, 3) (contradiction, neutral, entailment), shape checked."""
    probs = torch.as_tensor(nli_predict(premises, hypotheses, **kw), dtype=torch.float32)
    _require(probs.shape == (len(premises), 3),
             f"the NLI classifier returned shape {tuple(probs.shape)}, expected ({len(premises)}, 3)")
    return probs


def persona_nli_values(responses: list[str], personas_per_response: list[list[str]], nli,
                       batch_size: int = 64) -> list[list[int]]:
    """values[i][j] = NLI(p_j, u_i): +1 if persona sentence p_j entails response u_i, 0 if neutral, -1 if it
    contradicts (argmax of the classifier). Premise = the persona sentence, hypothesis = the response, as in
    the PAL authors' evaluation (InputExample(guid, persona, response)). One predict() call for all pairs."""
    _require(nli is not None, "C.score needs an NLI classifier; without one report C.score as unavailable "
             "(metrics.persona_coverage is the model-free persona score)")
    _require(len(responses) == len(personas_per_response),
             f"{len(responses)} responses but {len(personas_per_response)} persona lists")
    pairs = _pairs(responses, personas_per_response)
    values: list[list[int]] = [[] for _ in responses]
    if pairs:  # the classifier batches (and sorts by length) itself
        premises, hypotheses = [p for _, _, _, p in pairs], [r for _, _, r, _ in pairs]
        predicted = _entailment_probs(nli.predict, premises, hypotheses, batch_size=batch_size).argmax(-1).tolist()
        for (i, _, _, _), y in zip(pairs, predicted):
            values[i].append(C_SCORE_VALUE[y])
    return values


def c_scores(responses: list[str], personas_per_response: list[list[str]], nli, batch_size: int = 64) -> dict:
    """Both C.scores from one NLI pass, with v_ij = NLI(p_j, u_i) of persona_nli_values:

        c_score     = mean_i max_j v_ij   the PAL paper's numbers (its authors' code takes the max per response)
        c_score_sum = mean_i sum_j v_ij   Madotto et al. (2019)'s definition (range -m..m for m persona sentences)

    A response given no persona sentence counts 0 in both. No responses: both 0.0.
    Returns {"c_score", "c_score_sum", "per_response_max", "per_response_sum"}."""
    values = persona_nli_values(responses, personas_per_response, nli, batch_size)
    per_max = [float(max(v)) if v else 0.0 for v in values]
    per_sum = [float(sum(v)) for v in values]
    n = max(len(values), 1)
    return {"c_score": math.fsum(per_max) / n, "c_score_sum": math.fsum(per_sum) / n,
            "per_response_max": per_max, "per_response_sum": per_sum}


def c_score(responses: list[str], personas_per_response: list[list[str]], nli, batch_size: int = 64,
            return_per_response: bool = False, aggregate: str = "max"):
    """C.score (see c_scores): aggregate="max" (default) as the PAL paper's numbers were computed, "sum" as
    Madotto et al. (2019) define it. `nli` has predict(premises, hypotheses, batch_size=...) -> probs (N, 3),
    e.g. load_nli(...). Returns the score, or (score, per-response values) with return_per_response."""
    _require(aggregate in ("max", "sum"), f"aggregate must be 'max' or 'sum', got {aggregate!r}")
    out = c_scores(responses, personas_per_response, nli, batch_size)
    score, per = (out["c_score"], out["per_response_max"]) if aggregate == "max" else \
        (out["c_score_sum"], out["per_response_sum"])
    return (score, per) if return_per_response else score


def nli_persona_labels(examples: list[Example], nli_predict, threshold: float = 0.5,
                       batch_size: int = 64) -> list[int | None]:
    """Persona labels by NLI entailment (premise = the response, hypothesis = each persona sentence): the
    persona with the highest entailment probability if it is >= threshold, else None. nli_predict(premises,
    hypotheses) -> probs (N, 3), e.g. NLIClassifier.predict, gets batch_size pairs at a time. Apply the labels
    with data.relabel(examples, labels)."""
    pairs = _pairs([e.response for e in examples], [e.personas for e in examples])
    premises, hypotheses = [r for _, _, r, _ in pairs], [p for _, _, _, p in pairs]  # response entails persona?
    entail = [e for s in range(0, len(pairs), batch_size) for e in
              _entailment_probs(nli_predict, premises[s:s + batch_size], hypotheses[s:s + batch_size])[:, 2].tolist()]
    labels: list[int | None] = [None] * len(examples)
    best = [threshold] * len(examples)
    for (k, i, _, _), e in zip(pairs, entail):
        if e >= best[k] and (labels[k] is None or e > best[k]):  # strict > keeps the lower index on ties
            labels[k], best[k] = i, e
    return labels

