"""PAL, the pipeline: Persona-aware Learning (mixed-task SFT), Persona Alignment (DPO), Select then Generate.

    python pal.py sft      --run-dir R --model smol --data-dir D   # 1. mixed-task SFT on Train
    python pal.py pairs    --run-dir R                             # 2. persona-less responses on Valid#1
    python pal.py dpo      --run-dir R                             # 3. DPO: gold response > persona-less one
    python pal.py predict  --run-dir R                             # 4. Select then Generate on Test
    python pal.py evaluate --run-dir R [--nli DIR]                 # 5. BLEU / ROUGE-L / Entropy / C.score
    python pal.py all      --run-dir R ...                         # 1-5 in order
    python pal.py chat     --run-dir R                             # talk to the trained model
    python pal.py table    R1 R2 ...                               # several runs side by side

Every stage writes into one run directory and skips work that is already complete; an interrupted stage
resumes (training from its last checkpoint, generation from the last line written). The options given to the
first stage are stored in R/run.json and reused by the later ones (an option given again overrides it).

Read top to bottom:
  1. evaluation metrics  - BLEU-n, ROUGE-L, n-gram entropy, Distinct-n, persona coverage (our own code)
  2. run configuration   - RunConfig, variants (baselines and ablations), run.json
  3. helpers             - data, model loading, batched generation with progress, atomic JSONL
  4. stages              - sft, pairs, dpo, predict, evaluate, chat, table
  5. command line
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# 1. Evaluation metrics
# ----------------------------------------------------------------------------------------------------------

# Conventions, shared by every function here:
# - Hypothesis = what the model generated, reference = the gold response. Every function takes them in that
#   order: `f(hypotheses, references)`. (The paper authors' own script passes them the other way round to BLEU,
#   which changes precision into recall; we do not.)
# - A text may be given as a string (tokenized with `metric_tokens(text, lang)`) or as a list of tokens
#   (used as is). The same tokens reach BLEU, ROUGE-L, entropy and Distinct-n.
# - All scores are fractions in [0, 1] (entropy: nats). Papers print BLEU and ROUGE-L x100; that is the
#   caller's job.

# ---- Tokenization for metrics ----

# A "word" is a run of letters/digits; every other visible character (punctuation, symbols, "_") is a token
# of its own, so "home-made!" -> ["home", "-", "made", "!"] and "don't" -> ["don", "'", "t"].
_WORD_OR_PUNCT = re.compile(r"[^\W_]+|[^\w\s]|_")
# CJK ideographs (basic block, extension A, compatibility ideographs). In Chinese each one is a token.
_CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def metric_tokens(text: str, lang: str = "en") -> list[str]:
    """The tokens every metric in this module counts.

    English ("en"): lower-case, then split into words (runs of letters/digits) and single punctuation marks;
    whitespace only separates. "Hello, world!!" -> ["hello", ",", "world", "!", "!"].
    Chinese ("zh"): as English, but every CJK character is its own token (character-level BLEU/ROUGE, as
    Chinese dialogue papers report); Latin words and numbers inside Chinese text stay whole words.
    """
    if not isinstance(text, str):
        raise TypeError(f"metric_tokens expects a str, got {type(text).__name__}: {text!r:.80}")
    text = text.lower()
    if lang == "zh":
        text = _CJK_CHAR.sub(r" \g<0> ", text)  # isolate each ideograph, then split as English
    elif lang != "en":
        raise ValueError(f"metric_tokens: unknown lang {lang!r} (expected 'en' or 'zh')")
    return _WORD_OR_PUNCT.findall(text)


def _as_token_lists(texts, lang: str, what: str) -> list[list[str]]:
    """Strings are tokenized with metric_tokens; lists/tuples of strings are taken as tokens already."""
    if isinstance(texts, str):
        raise TypeError(f"{what}: expected a list of texts, got a single str {texts!r:.80}")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            out.append(metric_tokens(t, lang))
        elif isinstance(t, (list, tuple)) and set(map(type, t)) <= {str}:  # (map/set run in C: fast)
            out.append(t if isinstance(t, list) else list(t))
        else:
            raise TypeError(f"{what}[{i}]: expected a str or a list of str tokens, got {t!r:.80}")
    return out


def _paired(hypotheses, references, lang: str) -> tuple[list[list[str]], list[list[str]]]:
    hyps = _as_token_lists(hypotheses, lang, "hypotheses")
    refs = _as_token_lists(references, lang, "references")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references: they must pair up one to one")
    return hyps, refs


def _ngrams(tokens: list, n: int):
    """All contiguous n-grams of `tokens` as tuples (none when len(tokens) < n)."""
    return zip(*(tokens[i:] for i in range(n)))


# ---- BLEU ----


def _all_ngrams(tokens: list[str], max_n: int) -> list:
    """Every n-gram of `tokens` for n = 1..max_n in one list: unigrams are the tokens themselves (str), longer
    n-grams are tuples, so n-grams of different orders never compare equal. Order of g: 1 if str else len(g)."""
    shifted = [tokens[i:] for i in range(max_n)]
    out = list(tokens)
    for n in range(2, max_n + 1):
        out += zip(*shifted[:n])  # (t[i], t[i+1], ..., t[i+n-1]) for every start i
    return out


def bleu_statistics(hyps: list[list[str]], refs: list[list[str]], max_n: int = 4, compat: str = "nltk"):
    """Corpus sufficient statistics of BLEU: (matches[max_n], totals[max_n], hyp_len, ref_len).

    matches[k]: clipped (k+1)-gram matches summed over the corpus, i.e. for each pair
        sum over the hypothesis' (k+1)-grams g of min(count_hyp(g), count_ref(g)).
    totals[k]: number of hypothesis (k+1)-grams summed over the corpus. The two reference tools differ on a
        hypothesis shorter than k+1 tokens: nltk counts it as 1 (its per-sentence `max(1, count)`, to avoid
        dividing by zero), sacrebleu as 0. `compat` picks which one we reproduce.
    hyp_len / ref_len: summed lengths (one reference per hypothesis, so it is also the "closest" one).
    """
    if compat not in ("nltk", "sacrebleu"):
        raise ValueError(f"compat must be 'nltk' or 'sacrebleu', got {compat!r}")
    floor = 1 if compat == "nltk" else 0
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs):
        hyp_len += len(h)
        ref_len += len(r)
        for k in range(max_n):
            count = len(h) - k  # number of (k+1)-grams in the hypothesis
            totals[k] += count if count > 0 else floor
        # Only n-grams present on both sides can match; a set intersection finds them (typically a handful per
        # pair), then list.count clips each: min(count in hyp, count in ref). Both run in C: about twice as fast
        # as one Counter per order and side.
        hyp_grams, ref_grams = _all_ngrams(h, max_n), _all_ngrams(r, max_n)
        for g in set(hyp_grams).intersection(ref_grams):
            order = 1 if type(g) is str else len(g)
            matches[order - 1] += min(hyp_grams.count(g), ref_grams.count(g))
    return matches, totals, hyp_len, ref_len


def corpus_bleu(hypotheses, references, max_n: int = 4, lang: str = "en", compat: str = "nltk") -> list[float]:
    """Corpus-level BLEU-1..max_n (Papineni et al. 2002), one reference per hypothesis.

    Returns [BLEU-1, ..., BLEU-max_n] as fractions in [0, 1]. BLEU-n is *cumulative*: the geometric mean of
    the modified precisions p_1..p_n with uniform weights 1/n, times one corpus-level brevity penalty
        BP = 1 if c > r else exp(1 - r / c)   (0 when c = 0),
    c = total hypothesis length, r = total reference length. Precisions are micro-averaged over the corpus
    (matches and totals summed first, divided once).

    No smoothing: this equals nltk's `corpus_bleu(weights=(1/n,)*n)` with its default smoothing (method0)
    and, with compat="sacrebleu", sacrebleu's `BLEU(tokenize="none", smooth_method="none",
    max_ngram_order=n)` / 100, when both are fed the same tokens. The two tools differ only on hypotheses
    shorter than n tokens (see `bleu_statistics`); on a corpus without them both settings agree.

    Zero counts: if some order k <= n has no clipped match at all, BLEU-n is exactly 0.0 (log 0 = -inf).
    sacrebleu returns 0.0 too; nltk warns and returns a tiny positive number instead (it substitutes the
    smallest float for the precision, e.g. about 1e-77 for BLEU-4), i.e. 0 to within 1e-70.
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    hyps, refs = _paired(hypotheses, references, lang)
    matches, totals, c, r = bleu_statistics(hyps, refs, max_n, compat)
    if c == 0:
        return [0.0] * max_n  # nothing generated: BP = 0
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    scores, log_sum = [], 0.0
    for k in range(max_n):
        if matches[k] == 0 or totals[k] == 0:
            scores.extend([0.0] * (max_n - k))  # p_k = 0 zeroes this order and every higher one
            break
        log_sum += math.log(matches[k] / totals[k])
        scores.append(bp * math.exp(log_sum / (k + 1)))
    return scores


# ---- ROUGE-L ----


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists, bit-parallel.

    Allison-Dix / Hyyro: bit i of `v` stands for position i of `a`. One step per token of `b` updates all
    len(a) DP cells at once with integer arithmetic, so the cost is O(len(b)) big-int operations instead of
    a Python loop over len(a) * len(b) cells. After the last step, LCS = number of zero bits in v.
    """
    if not a or not b:
        return 0
    match = {}  # token -> bitmask of the positions in `a` where it occurs
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = match.get(tok)
        if m is None:
            continue  # u = 0 leaves v unchanged
        u = v & m
        v = ((v + u) | (v - u)) & full  # the carry of v + u moves each matched bit to the next free slot
    return len(a) - v.bit_count()


def rouge_l_scores(hypotheses, references, beta: float = 1.0, lang: str = "en") -> list[float]:
    """Sentence-level ROUGE-L F_beta for each (hypothesis, reference) pair (Lin 2004).

    P = LCS / len(hyp), R = LCS / len(ref), F_beta = (1 + beta^2) P R / (R + beta^2 P); 0 when LCS = 0
    (so also when either side is empty). beta = 1 is the F1 of Google's rouge-score (`RougeScorer(["rougeL"])`
    fmeasure, stemming off); beta = 1.2 is the variant in pycocoevalcap's Rouge (single reference).
    """
    hyps, refs = _paired(hypotheses, references, lang)
    b2 = beta * beta
    out = []
    for h, r in zip(hyps, refs):
        # bits over the longer side: fewer steps, and lcs_length is symmetric
        lcs = lcs_length(h, r) if len(h) >= len(r) else lcs_length(r, h)
        if lcs == 0:
            out.append(0.0)
            continue
        p, rec = lcs / len(h), lcs / len(r)
        if beta == 1.0:
            out.append(2 * p * rec / (p + rec))  # the exact expression rouge-score evaluates
        else:
            out.append((1 + b2) * p * rec / (rec + b2 * p))
    return out


def rouge_l(hypotheses, references, beta: float = 1.0, lang: str = "en") -> float:
    """ROUGE-L F_beta averaged over pairs (F1 by default; beta=1.2 for pycocoevalcap's variant)."""
    scores = rouge_l_scores(hypotheses, references, beta, lang)
    return math.fsum(scores) / len(scores) if scores else 0.0


# ---- Diversity: n-gram entropy and Distinct-n ----


def _corpus_ngram_counts(hypotheses, n: int, lang: str) -> Counter:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts = Counter()
    for toks in _as_token_lists(hypotheses, lang, "hypotheses"):
        counts.update(_ngrams(toks, n))
    return counts


def ngram_entropy(hypotheses, n: int, lang: str = "en", base: float = math.e) -> float:
    """Entropy of the n-gram frequency distribution over all generated responses (Zhang et al. 2018's
    "Ent-n"): pool every n-gram of every hypothesis, p(g) = count(g) / total, H = -sum_g p(g) log p(g).

    Natural log (nats) by default, as in the dialogue papers' common script; pass base=2 for bits.
    No n-grams at all -> 0.0.
    """
    counts = _corpus_ngram_counts(hypotheses, n, lang)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    # H = log T - (1/T) sum_g c_g log c_g : one log per distinct n-gram
    h = math.log(total) - math.fsum(c * math.log(c) for c in counts.values()) / total
    return h / math.log(base)


def distinct_n(hypotheses, n: int, lang: str = "en") -> float:
    """Distinct-n (Li et al. 2016), corpus level: distinct n-grams / all n-grams, pooled over every
    hypothesis. No n-grams at all -> 0.0."""
    counts = _corpus_ngram_counts(hypotheses, n, lang)
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


# ---- Lexical persona coverage (no model needed; NOT the NLI-based C.score) ----

# Function words that say nothing about a persona. Hand-written; deliberately short.
STOPWORDS_EN = frozenset(
    """a an the and or but if so of to in on at by for with from as into about than then there here
    i me my mine myself you your yours we us our ours he him his she her hers it its they them their theirs
    this that these those what which who whom whose when where why how
    am is are was were be been being do does did done have has had having will would shall should can could
    may might must not no yes too very just also all any some more most much many one ones
    s t m d ll re ve don ok oh hi hello well really like get got go going""".split()
)


def _content_words(tokens: list[str], stopwords) -> set[str]:
    """Tokens that carry meaning: no stopword, no punctuation (a token without a letter/digit/ideograph)."""
    return {t for t in tokens if t[:1].isalnum() and t not in stopwords}


def persona_coverage(responses, personas_per_response, lang: str = "en", stopwords=None) -> float:
    """Lexical persona coverage: how much of its persona a response mentions, measured by word overlap.

    For response r with persona sentences p_1..p_m, let W(x) be the set of content words of x (metric
    tokens minus stopwords and punctuation; for Chinese, characters minus punctuation). Then
        cov(r) = max_j |W(r) & W(p_j)| / |W(p_j)|       (persona sentences with empty W are skipped)
    i.e. the fraction of the best-covered persona sentence's content words that the response uses; 0 if no
    persona sentence has content words. The score is the mean of cov(r) over responses, in [0, 1].

    This is a *different metric* from C.score (nli.c_score): it needs no model and cannot tell entailment
    from contradiction ("i love dogs" and "i hate dogs" cover "i have dogs" equally). Report it under its own
    name; never as C.score.
    """
    if len(responses) != len(personas_per_response):
        raise ValueError(f"{len(responses)} responses but {len(personas_per_response)} persona lists")
    if stopwords is None:
        stopwords = STOPWORDS_EN if lang == "en" else frozenset()
    total = 0.0
    for i, (resp, personas) in enumerate(zip(responses, personas_per_response)):
        if isinstance(personas, str):
            raise TypeError(f"personas_per_response[{i}] must be a list of persona sentences, got a str")
        r_words = _content_words(_as_token_lists([resp], lang, "responses")[0], stopwords)
        best = 0.0
        for p in _as_token_lists(personas, lang, f"personas_per_response[{i}]"):
            p_words = _content_words(p, stopwords)
            if p_words:
                best = max(best, len(r_words & p_words) / len(p_words))
        total += best
    return total / len(responses) if len(responses) else 0.0


# ----------------------------------------------------------------------------------------------------------
# 2. Run configuration
# ----------------------------------------------------------------------------------------------------------

# What each variant changes. The four switches:
#   tasks     SFT tasks: "mix" (persona selection + persona-enhanced generation, interleaved: PAL),
#             "dg" (generation only), "ps" (selection only), "seq" (selection, then generation: w/o Mix)
#   fmt       "prompt" (PAL's instruction prompts) or "plain" (personas and history as plain lines)
#   align     second stage: "dpo" (PAL), "sft" (SFT on Valid#1's gold responses: w/o PC), "none" (w/o PA)
#   strategy  inference: "select" (Select then Generate), "random" (a random persona is highlighted),
#             "none" (Not Select: generate without a highlighted persona)
VARIANTS = {
    "pal":        dict(tasks="mix", fmt="prompt", align="dpo", strategy="select"),
    "ft":         dict(tasks="dg", fmt="plain", align="none", strategy="none"),   # fine-tuning w/o prompts
    "prompting":  dict(tasks="dg", fmt="prompt", align="none", strategy="none"),  # generation task only
    "wo_mix":     dict(tasks="seq", fmt="prompt", align="dpo", strategy="select"),
    "wo_pa":      dict(tasks="mix", fmt="prompt", align="none", strategy="select"),
    "only_dg":    dict(tasks="dg", fmt="prompt", align="dpo", strategy="none"),
    "only_ps":    dict(tasks="ps", fmt="prompt", align="dpo", strategy="select"),
    "wo_pc":      dict(tasks="mix", fmt="prompt", align="sft", strategy="select"),
    "random":     dict(tasks="mix", fmt="prompt", align="dpo", strategy="random"),
    "not_select": dict(tasks="mix", fmt="prompt", align="dpo", strategy="none"),
}
CHOICES = {"tasks": ("mix", "dg", "ps", "seq"), "fmt": ("prompt", "plain"), "align": ("dpo", "sft", "none"),
           "strategy": ("select", "random", "none")}


@dataclass
class RunConfig:
    """Everything a run depends on; stored in RUN_DIR/run.json by the first stage."""
    model: str = "smol"                 # model name (smol, gpt2, owner/name hub id) or local directory
    data_dir: str | None = None         # PERSONA-CHAT directory (or Baidu-Persona-Chat JSONL directory)
    variant: str = "pal"                # a key of VARIANTS; the four switches below default from it
    tasks: str | None = None
    fmt: str | None = None
    align: str | None = None
    strategy: str | None = None
    lang: str | None = None             # "en" / "zh"; None: detected from the data
    limit: int | None = None            # examples per split (None: all)
    labels: str = "lexical"             # persona labels of the selection task: lexical | nli (needs --nli)
    seed: int = 0
    select_ratio: float = 1.0           # share of examples that also get a selection feature in mixed SFT
    max_len: int = 512                  # tokens per training sequence (oldest history turns dropped first)
    # model / precision
    dtype: str = "fp32"                 # weights: fp32 | bf16 | fp16
    precision: str = "fp32"             # training autocast: fp32 | bf16 | fp16
    lora_r: int = 0                     # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    # SFT (paper: lr 2e-5, 100 warmup steps, 10 epochs)
    sft_lr: float = 2e-5
    sft_epochs: float = 10.0
    sft_warmup: int = 100
    sft_reduction: str = "sum"          # PAL sums the NLL per sequence; "mean" = per target token
    batch_size: int = 8
    grad_accum: int = 1
    # DPO (paper: beta 0.1, 100 warmup steps, up to 30000 steps with early stopping)
    dpo_lr: float = 5e-6
    dpo_beta: float = 0.1
    dpo_steps: int = 30000
    dpo_epochs: float | None = None     # when set, overrides dpo_steps with this many passes over the pairs
    dpo_warmup: int = 100
    eval_every: int = 500
    patience: int = 5
    eval_limit: int = 200               # validation examples generated for each early-stopping score
    # generation (greedy)
    max_new_tokens: int = 48
    select_max_new_tokens: int = 48
    gen_batch: int = 16
    gen_dtype: str | None = None        # weights for pairs/predict/chat (e.g. fp16 on GPU); None: as dtype
    nli: str | None = None              # NLI checkpoint for C.score (and the DPO validation score)

    def switches(self) -> dict:
        base = VARIANTS[self.variant]
        return {k: getattr(self, k) or base[k] for k in CHOICES}


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_run_config(run_dir: Path, overrides: dict) -> RunConfig:
    """run.json (if any) with the options given on this command line on top; writes the result back."""
    path = run_dir / "run.json"
    base = json.loads(path.read_text()) if path.exists() else {}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = set(base) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    merged = {**base, **{k: v for k, v in overrides.items() if v is not None and k in known}}
    cfg = RunConfig(**merged)
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; choose from {', '.join(VARIANTS)}")
    for k, allowed in CHOICES.items():
        v = getattr(cfg, k)
        if v is not None and v not in allowed:
            raise ValueError(f"--{k} {v!r}: choose from {', '.join(allowed)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, dataclasses.asdict(cfg))
    return cfg


# ----------------------------------------------------------------------------------------------------------
# 3. Helpers
# ----------------------------------------------------------------------------------------------------------

def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e}): {line[:80]!r}") from None
    return rows


class JsonlWriter:
    """Appends rows to PATH.partial and renames it to PATH when complete, so a finished file is never half
    written and an interrupted run resumes after the last complete line."""

    def __init__(self, path: Path):
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        self.done_rows = []
        if self.partial.exists():  # keep the complete lines of an interrupted run
            text = self.partial.read_text(encoding="utf-8")
            lines = text.split("\n")
            complete = lines[:-1]  # the last piece has no newline: cut off mid-write, or empty
            self.done_rows = [json.loads(l) for l in complete if l.strip()]
            self.partial.write_text("".join(l + "\n" for l in complete if l.strip()), encoding="utf-8")
        self.f = open(self.partial, "a", encoding="utf-8")

    def write(self, row: dict):
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()

    def finish(self):
        self.f.close()
        os.replace(self.partial, self.path)


def say(msg: str):
    print(f"[pal] {msg}", file=sys.stderr, flush=True)


def load_data(cfg: RunConfig):
    """(splits, lang) of this run: the four splits of the paper's Table 1 with persona labels."""
    import data
    if cfg.data_dir is None:
        raise ValueError("no data: give --data-dir (a PERSONA-CHAT directory; `python data.py download` "
                         "fetches it)")
    splits, info = data.load_splits(cfg.data_dir, limit=cfg.limit)
    say(info.message)
    if cfg.labels == "nli":  # entailment labels instead of the lexical ones (data.nli_persona_labels)
        if not cfg.nli:
            raise ValueError("--labels nli needs --nli (an NLI checkpoint for nli.load_nli)")
        predict = _load_nli(cfg).predict
        splits = {k: data.relabel(v, data.nli_persona_labels(v, predict)) for k, v in splits.items()}
    elif cfg.labels != "lexical":
        raise ValueError(f"--labels {cfg.labels!r}: choose lexical or nli")
    lang = cfg.lang or data.detect_lang(splits["valid1"] or splits["test"])
    return splits, lang


def load_tok(cfg: RunConfig):
    import data
    return data.load_tokenizer(cfg.model)


def load_stage_model(cfg: RunConfig, weights: str | Path | None, trainable: bool):
    """The base model, or a stage's exported weights (HF layout), optionally with fresh LoRA adapters.
    Models loaded only to generate use gen_dtype."""
    import model as modeling
    src = weights if weights is not None else cfg.model
    dtype = cfg.dtype if trainable else (cfg.gen_dtype or cfg.dtype)
    m = modeling.load_model(src, dtype=_torch_dtype(dtype), device=_device())
    if trainable and cfg.lora_r:
        modeling.add_lora(m, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    elif trainable:
        m.requires_grad_(True)
    return m


def _device() -> str:
    import torch
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def generate_texts(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, batch: int,
                   desc: str = "generate", on_batch=None, start: int = 0) -> list[str]:
    """Greedy replies for many prompts, batched by similar length (less padding), in the input order.
    on_batch(indices, texts) is called after each batch (for incremental writing); `start` skips prompts
    already done. Returns the texts of prompts start.. in order."""
    import model as modeling
    from tqdm import tqdm
    todo = list(range(start, len(prompt_ids)))
    out: dict[int, str] = {}
    # batches are consecutive in the input order (so a resumed run continues after the last full batch)
    bar = tqdm(total=len(todo), desc=desc, disable=len(todo) < 2 * batch, dynamic_ncols=True)
    for lo in range(0, len(todo), batch):
        idx = todo[lo:lo + batch]
        new = modeling.generate(model, [prompt_ids[i] for i in idx], max_new_tokens, tok.stop_ids)
        texts = [tok.decode(t).strip() for t in new]
        out.update(zip(idx, texts))
        if on_batch:
            on_batch(idx, texts)
        bar.update(len(idx))
    bar.close()
    return [out[i] for i in todo]


def prompt_mode(cfg: RunConfig) -> str:
    """The prompt mode of the generation task: PAL's persona-enhanced prompt, or plain lines (ft)."""
    return "noprompt" if cfg.switches()["fmt"] == "plain" else "generate"


def select_then_generate(model, tok, examples, cfg: RunConfig, lang: str, strategy: str | None = None,
                         desc: str = "predict", writer: JsonlWriter | None = None) -> list[dict]:
    """PAL's inference for each example: 1. the model picks the persona sentence the reply should use
    (selection prompt), 2. it replies with *that* sentence highlighted. Never the gold label.
    strategy "random" highlights a random persona sentence, "none" highlights nothing (Not Select)."""
    import data
    strategy = strategy or cfg.switches()["strategy"]
    mode = prompt_mode(cfg)
    start = len(writer.done_rows) if writer else 0
    rows = list(writer.done_rows) if writer else []
    rng = random.Random(cfg.seed)
    todo = examples[start:]
    # 1. selection
    if strategy == "select" and mode == "generate":
        room = cfg.max_len - cfg.select_max_new_tokens  # oldest history turns are dropped beyond this
        sel_ids = [data.encode_generation_prompt(tok, e, "select", lang, max_len=room)[0] for e in todo]
        picks = generate_texts(model, tok, sel_ids, cfg.select_max_new_tokens, cfg.gen_batch, f"{desc}: select")
        selected = [data.parse_selection(t, e.personas, lang) for t, e in zip(picks, todo)]
    elif strategy == "random":
        picks = None
        selected = [rng.choice(e.personas) if e.personas else None for e in todo]
    else:
        picks = None
        selected = [None] * len(todo)
    # 2. generation with the selected persona highlighted
    room = cfg.max_len - cfg.max_new_tokens
    gen_ids = [data.encode_generation_prompt(tok, e, mode, lang, persona=p, max_len=room)[0]
               for e, p in zip(todo, selected)]

    def write(idx, texts):
        for i, t in zip(idx, texts):
            e = todo[i]
            row = {"dialogue_id": e.dialogue_id, "personas": e.personas, "history": e.history,
                   "selection_output": picks[i] if picks else None, "selected_persona": selected[i],
                   "response": t, "gold": e.response,
                   "gold_persona": e.personas[e.persona_label] if e.persona_label is not None else None}
            rows.append(row)
            if writer:
                writer.write(row)

    generate_texts(model, tok, gen_ids, cfg.max_new_tokens, cfg.gen_batch, f"{desc}: generate", on_batch=write)
    return rows


def score_generations(rows: list[dict], lang: str, nli=None) -> dict:
    """All metrics of a list of generation rows (response, gold, personas). BLEU/ROUGE-L x100 as in the
    paper's tables; entropy in nats. C.score only with an NLI classifier: otherwise None, never invented."""
    hyps = [r["response"] for r in rows]
    refs = [r["gold"] for r in rows]
    personas = [r["personas"] for r in rows]
    bleu = corpus_bleu(hyps, refs, max_n=4, lang=lang)
    res = {"n": len(rows), "bleu1": 100 * bleu[0], "bleu2": 100 * bleu[1], "bleu4": 100 * bleu[3],
           "rouge_l": 100 * rouge_l(hyps, refs, lang=lang)}
    for n in (1, 2, 3, 4):
        res[f"entropy{n}"] = ngram_entropy(hyps, n, lang=lang)
    res["entropy"] = res["entropy4"]  # the paper's "Entropy" column: 4-gram entropy
    res["distinct1"], res["distinct2"] = distinct_n(hyps, 1, lang=lang), distinct_n(hyps, 2, lang=lang)
    res["persona_coverage"] = 100 * persona_coverage(hyps, personas, lang=lang)
    if nli is not None:
        import nli as nli_mod
        res["c_score"] = nli_mod.c_score(hyps, personas, nli)
    else:
        res["c_score"] = None
    return res


def validation_score(rows: list[dict], lang: str, nli=None) -> dict:
    """The early-stopping score of a validation pass: C.score when an NLI model is given (as in the paper),
    else the lexical persona coverage plus BLEU-1 (so that a degenerate copy of a persona does not win)."""
    s = score_generations(rows, lang, nli)
    s["score"] = s["c_score"] if s["c_score"] is not None else s["persona_coverage"] + s["bleu1"]
    return s


# ----------------------------------------------------------------------------------------------------------
# 4. Stages
# ----------------------------------------------------------------------------------------------------------

def sft_phases(cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """The SFT phases of a run: (name, prompt modes trained together). w/o Mix trains the two tasks one
    after the other instead of interleaved."""
    tasks = cfg.switches()["tasks"]
    if cfg.switches()["fmt"] == "plain":
        return [("dg", ["noprompt"])]
    return {"mix": [("mix", ["select", "generate"])], "dg": [("dg", ["generate"])], "ps": [("ps", ["select"])],
            "seq": [("ps", ["select"]), ("dg", ["generate"])]}[tasks]


def sft_features_for(tok, examples, modes: list[str], cfg: RunConfig, lang: str):
    import data
    if modes == ["select", "generate"]:
        feats, stats = data.mixed_task_features(tok, examples, cfg.select_ratio, cfg.seed, lang, cfg.max_len)
    else:
        feats, stats = data.sft_features(tok, examples, modes[0], lang, cfg.max_len)
    say(f"SFT features ({'+'.join(modes)}): {stats.summary()}")
    return feats


def _train_config(cfg: RunConfig, mode: str, out_dir: Path, n_features: int):
    import dpo
    if mode == "sft":
        return dpo.TrainConfig(mode="sft", out_dir=str(out_dir), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                               epochs=cfg.sft_epochs, lr=cfg.sft_lr, warmup_steps=cfg.sft_warmup,
                               precision=cfg.precision, sft_reduction=cfg.sft_reduction, seed=cfg.seed,
                               eval_every=0, resume=True)
    steps = cfg.dpo_steps
    if cfg.dpo_epochs is not None:
        steps = max(1, math.ceil(cfg.dpo_epochs * n_features / (cfg.batch_size * cfg.grad_accum)))
    return dpo.TrainConfig(mode="dpo", out_dir=str(out_dir), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                           max_steps=steps, lr=cfg.dpo_lr, warmup_steps=cfg.dpo_warmup, beta=cfg.dpo_beta,
                           precision=cfg.precision, seed=cfg.seed, eval_every=cfg.eval_every,
                           patience=cfg.patience, resume=True)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def stage_sft(cfg: RunConfig, run: Path):
    """Persona-aware Learning: mixed-task SFT on Train (selection + persona-enhanced generation)."""
    out = run / "sft" / "final"
    if out.exists():
        say(f"sft: {out} exists, skipping")
        return out
    import data
    import dpo
    splits, lang = load_data(cfg)
    tok = load_tok(cfg)
    weights = None
    for k, (name, modes) in enumerate(sft_phases(cfg)):
        phase_dir = run / "sft" / f"phase{k}-{name}"
        if not (phase_dir / "final").exists():
            say(f"sft phase {k} ({name}): tasks {modes} on {len(splits['train'])} Train examples")
            model = load_stage_model(cfg, weights, trainable=True)
            feats = sft_features_for(tok, splits["train"], modes, cfg, lang)
            # validation: the summed NLL of the generation task on Valid#1+Valid#2 (higher score = lower loss)
            val = (splits["valid1"] + splits["valid2"])[: cfg.eval_limit]
            val_feats = data.sft_features(tok, val, modes[-1], lang, cfg.max_len)[0] if val else []
            tcfg = _train_config(cfg, "sft", phase_dir, len(feats))
            if val_feats:
                tcfg.eval_every = max(1, int(math.ceil(len(feats) / (cfg.batch_size * cfg.grad_accum))))
            collate = lambda fs: data.collate_sft(fs, tok.pad_id)
            eval_fn = (lambda m: _neg_val_loss(m, val_feats, collate, cfg.batch_size)) if val_feats else None
            dpo.train(model, tcfg, feats, collate, eval_fn=eval_fn)
            del model
        weights = phase_dir / "final"
    if _is_rank0():
        _copy_dir_atomic(weights, out)
    return out


def _neg_val_loss(model, feats, collate, batch_size) -> dict:
    import torch
    import dpo
    total, n = 0.0, 0
    dev = next(model.parameters()).device
    with torch.no_grad():
        for lo in range(0, len(feats), batch_size):
            b = collate(feats[lo:lo + batch_size])
            logps, _ = dpo.model_logps(model, b["input_ids"].to(dev), b["labels"].to(dev))
            total += -logps.sum().item()
            n += len(logps)
    return {"score": -total / max(n, 1), "val_nll": total / max(n, 1)}


def _copy_dir_atomic(src: Path, dst: Path):
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)


def stage_pairs(cfg: RunConfig, run: Path):
    """The SFT model answers each Valid#1 example from the history alone (no persona): the rejected side of
    PAL's preference pairs; the gold response is the chosen side."""
    out = run / "pairs.jsonl"
    if out.exists():
        say(f"pairs: {out} exists, skipping")
        return out
    import data
    splits, lang = load_data(cfg)
    tok = load_tok(cfg)
    model = load_stage_model(cfg, run / "sft" / "final", trainable=False)
    examples = splits["valid1"]
    writer = JsonlWriter(out)
    start = len(writer.done_rows)
    if start:
        say(f"pairs: resuming after {start} of {len(examples)} examples")
    room = cfg.max_len - cfg.max_new_tokens
    ids = [data.encode_generation_prompt(tok, e, "history", lang, max_len=room)[0] for e in examples]

    def write(idx, texts):
        for i, t in zip(idx, texts):
            e = examples[i]
            writer.write({"dialogue_id": e.dialogue_id, "personas": e.personas, "history": e.history,
                          "persona_label": e.persona_label, "chosen": e.response, "rejected": t})

    generate_texts(model, tok, ids, cfg.max_new_tokens, cfg.gen_batch, "pairs", on_batch=write, start=start)
    writer.finish()
    return out


def _example_from_row(row: dict):
    import data
    return data.Example(personas=row["personas"], history=row["history"], response=row["chosen"],
                        persona_label=row.get("persona_label"), dialogue_id=row.get("dialogue_id", -1),
                        candidates=None)


def stage_dpo(cfg: RunConfig, run: Path):
    """Persona Alignment: DPO from the SFT weights (reference = the SFT model) preferring the gold response
    over the persona-less one, early-stopped on the Valid#2 score. w/o PC: SFT on the gold responses instead."""
    align = cfg.switches()["align"]
    out = run / "dpo" / "final"
    if align == "none":
        say("dpo: this variant has no alignment stage (w/o PA); predict uses the SFT model")
        return run / "sft" / "final"
    if out.exists():
        say(f"dpo: {out} exists, skipping")
        return out
    import data
    import dpo
    splits, lang = load_data(cfg)
    tok = load_tok(cfg)
    mode = prompt_mode(cfg)
    pairs = read_jsonl(run / "pairs.jsonl") if align == "dpo" else None
    policy = load_stage_model(cfg, run / "sft" / "final", trainable=True)
    ref = None
    if align == "dpo" and not cfg.lora_r:  # full fine-tuning: the reference is a frozen copy of the SFT model
        ref = load_stage_model(cfg, run / "sft" / "final", trainable=False)
    val = splits["valid2"][: cfg.eval_limit]
    nli_model = _load_nli(cfg)

    def eval_fn(m):
        rows = select_then_generate(m, tok, val, cfg, lang, desc="validate")
        return validation_score(rows, lang, nli_model)

    if align == "dpo":
        stats = data.EncodeStats()
        feats = [data.dpo_feature(tok, _example_from_row(r), r["rejected"], mode, lang, cfg.max_len, stats=stats)
                 for r in pairs]
        say(f"dpo: {len(feats)} pairs; {stats.summary()}")
        collate = lambda fs: data.collate_dpo(fs, tok.pad_id)
        tcfg = _train_config(cfg, "dpo", run / "dpo", len(feats))
    else:  # w/o PC: the same Valid#1 examples, gold responses only, plain SFT
        feats = data.sft_features(tok, splits["valid1"], mode, lang, cfg.max_len)[0]
        collate = lambda fs: data.collate_sft(fs, tok.pad_id)
        tcfg = _train_config(cfg, "dpo", run / "dpo", len(feats))
        tcfg = dataclasses.replace(tcfg, mode="sft", lr=cfg.sft_lr)
    tcfg.eval_every = min(tcfg.eval_every, tcfg.max_steps) if tcfg.eval_every else 0
    dpo.train(policy, tcfg, feats, collate, eval_fn=eval_fn if val else None, ref_model=ref)
    return out


def _load_nli(cfg: RunConfig):
    if not cfg.nli:
        return None
    import nli
    return nli.load_nli(cfg.nli)


def final_weights(cfg: RunConfig, run: Path) -> Path:
    return run / ("sft" if cfg.switches()["align"] == "none" else "dpo") / "final"


def stage_predict(cfg: RunConfig, run: Path):
    """Select then Generate on Test: generations.jsonl (personas, history, selected persona, response, gold)."""
    out = run / "generations.jsonl"
    if out.exists():
        say(f"predict: {out} exists, skipping")
        return out
    splits, lang = load_data(cfg)
    tok = load_tok(cfg)
    model = load_stage_model(cfg, final_weights(cfg, run), trainable=False)
    writer = JsonlWriter(out)
    if writer.done_rows:
        say(f"predict: resuming after {len(writer.done_rows)} of {len(splits['test'])} examples")
    select_then_generate(model, tok, splits["test"], cfg, lang, writer=writer)
    writer.finish()
    return out


def stage_evaluate(cfg: RunConfig, run: Path):
    """BLEU-1/2, ROUGE-L, Entropy, C.score (with --nli) and persona coverage -> results.json, results.md."""
    out = run / "results.json"
    if out.exists():
        say(f"evaluate: {out} exists, skipping")
        return out
    rows = read_jsonl(run / "generations.jsonl")
    lang = cfg.lang or ("zh" if any(re.search(r"[\u4e00-\u9fff]", r["gold"]) for r in rows[:20]) else "en")
    res = score_generations(rows, lang, _load_nli(cfg))
    res.update(variant=cfg.variant, model=cfg.model, **cfg.switches(), lang=lang)
    write_json_atomic(out, res)
    md = results_table([(run.name, res)])
    tmp = run / ".tmp-results.md"
    tmp.write_text(md + "\n")
    os.replace(tmp, run / "results.md")
    print(md)
    return out


TABLE_COLUMNS = [("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"), ("ROUGE-L", "rouge_l"), ("Entropy", "entropy"),
                 ("C.score", "c_score"), ("Persona cov.", "persona_coverage"), ("Dist-2", "distinct2")]


def results_table(named: list[tuple[str, dict]]) -> str:
    """Markdown in the layout of the paper's Table 2 (one row per run); C.score shows n/a without an NLI model."""
    head = "| Run | " + " | ".join(c for c, _ in TABLE_COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for name, res in named:
        cells = []
        for _, k in TABLE_COLUMNS:
            v = res.get(k)
            cells.append("n/a" if v is None else (f"{v:.4f}" if k == "distinct2" else f"{v:.2f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_table(run_dirs: list[str]):
    named = []
    for d in run_dirs:
        p = Path(d) / "results.json"
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: run `python pal.py evaluate --run-dir {d}` first")
        named.append((Path(d).name, json.loads(p.read_text())))
    print(results_table(named))


def stage_chat(cfg: RunConfig, run: Path, personas: list[str] | None = None, stream=None):
    """Talk to the trained model: type persona sentences (or press enter for a random Test persona), then chat.
    Each turn shows the persona sentence the model selected before its reply."""
    import data
    stream = stream or sys.stdin
    weights = final_weights(cfg, run)
    if not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist: train first (python pal.py all --run-dir {run})")
    tok = load_tok(cfg)
    model = load_stage_model(cfg, weights, trainable=False)
    lang = cfg.lang or "en"
    if not personas:
        print("Persona sentences, one per line; an empty line ends (empty at once: a random Test persona).")
        personas = []
        for line in stream:
            if not line.strip():
                break
            personas.append(line.strip())
        if not personas and cfg.data_dir:
            splits, lang = load_data(cfg)
            personas = random.Random().choice(splits["test"]).personas
    print("Persona:\n" + "\n".join(f"  - {p}" for p in personas) + "\n(empty line or Ctrl-D quits)")
    history: list[str] = []
    while True:
        print("you> ", end="", flush=True)
        line = stream.readline()
        if not line or not line.strip():
            break
        history.append(line.strip())
        ex = data.Example(personas=personas, history=list(history), response="", persona_label=None,
                          dialogue_id=-1, candidates=None)
        row = select_then_generate(model, tok, [ex], cfg, lang, desc="chat")[0]
        print(f"   [persona: {row['selected_persona'] or '-'}]")
        print(f"bot> {row['response']}")
        history.append(row["response"])


# ----------------------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------------------

STAGES = {"sft": stage_sft, "pairs": stage_pairs, "dpo": stage_dpo, "predict": stage_predict,
          "evaluate": stage_evaluate}


def _field_type(f) -> type:
    t = str(f.type)  # annotations are strings here (from __future__ import annotations)
    return int if t.startswith("int") else float if t.startswith("float") else str


def _add_run_options(p: argparse.ArgumentParser):
    p.add_argument("--run-dir", required=True, help="directory of this run (created; holds run.json)")
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in CHOICES:
            p.add_argument(flag, choices=CHOICES[f.name], default=None, help=f"override the variant's {f.name}")
        elif f.name == "variant":
            p.add_argument(flag, choices=list(VARIANTS), default=None,
                           help="baseline / ablation preset (default pal): " + ", ".join(VARIANTS))
        else:  # default None: "not given", so run.json's value stands
            p.add_argument(flag, type=_field_type(f), default=None, help=f"(default {f.default})")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pal.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    helps = {"sft": stage_sft.__doc__, "pairs": stage_pairs.__doc__, "dpo": stage_dpo.__doc__,
             "predict": stage_predict.__doc__, "evaluate": stage_evaluate.__doc__,
             "all": "sft, pairs, dpo, predict and evaluate in order (each skipped when complete)",
             "chat": stage_chat.__doc__}
    for name, h in helps.items():
        p = sub.add_parser(name, help=h.split("\n")[0], description=h)
        _add_run_options(p)
        if name == "chat":
            p.add_argument("--persona", action="append", help="a persona sentence (repeat the flag)")
    pt = sub.add_parser("table", help="several runs' results.json side by side (Markdown)")
    pt.add_argument("run_dirs", nargs="+")
    args = ap.parse_args(argv)
    if args.stage == "table":
        return stage_table(args.run_dirs)
    run = Path(args.run_dir)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}
    cfg = load_run_config(run, given)
    if args.stage == "chat":
        return stage_chat(cfg, run, args.persona)
    order = list(STAGES) if args.stage == "all" else [args.stage]
    for s in order:
        if s == "pairs" and cfg.switches()["align"] != "dpo":
            say(f"pairs: not needed by variant {cfg.variant} (align={cfg.switches()['align']}), skipping")
            continue
        if s not in ("sft", "dpo") and not _is_rank0():
            continue  # under torchrun only training uses every rank; generation and scoring run on rank 0
        t0 = time.time()
        STAGES[s](cfg, run)
        say(f"{s}: done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
