"""Word-overlap and diversity metrics for PAL's evaluation: BLEU, ROUGE-L, n-gram entropy, Distinct-n,
and a lexical persona-coverage score.

Draft module: the lead merges it into pal.py's evaluation part. Only the standard library is used, so it
can be read (and run) on its own.

Conventions, shared by every function here:
- Hypothesis = what the model generated, reference = the gold response. Every function takes them in that
  order: `f(hypotheses, references)`. (The paper authors' own script passes them the other way round to BLEU,
  which changes precision into recall; we do not.)
- A text may be given as a string (tokenized with `metric_tokens(text, lang)`) or as a list of tokens
  (used as is). The same tokens reach BLEU, ROUGE-L, entropy and Distinct-n.
- All scores are fractions in [0, 1] (entropy: nats). Papers print BLEU and ROUGE-L x100; that is the
  caller's job.
"""
import math
import re
from collections import Counter

# ----------------------------------------------------------------------------------------------------------
# Tokenization for metrics
# ----------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------
# BLEU
# ----------------------------------------------------------------------------------------------------------


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
        # pair), then list.count clips each: min(count in hyp, count in ref). Both run in C, which makes this
        # several times faster than building a Counter per order.
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


# ----------------------------------------------------------------------------------------------------------
# ROUGE-L
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Diversity: n-gram entropy and Distinct-n
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Lexical persona coverage (no model needed; NOT the NLI-based C.score)
# ----------------------------------------------------------------------------------------------------------

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
