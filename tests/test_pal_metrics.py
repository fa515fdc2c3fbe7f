"""pal.py's evaluation metrics against the tools everyone trusts (nltk, sacrebleu, rouge-score) and hand-derived values.

The real pairs come from PERSONA-CHAT valid: each gold response is scored against the response at the same
turn of another dialogue, plus identical pairs, empty hypotheses/references and over-long hypotheses.
"""
import math
import random
import warnings

import pytest
from conftest import shared_file

import pal as M  # the metrics live in pal.py's evaluation part

TOL = 1e-6


# ---------------------------------------------------------------------------------------------- fixtures


def _read_dialogues(path) -> list[list[str]]:
    """Responses (second tab field) of each dialogue of a ParlAI 'self' file; a line number 1 opens a new one."""
    dialogues = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            num, _, rest = line.rstrip("\n").partition(" ")
            if num == "1":
                dialogues.append([])
            if "\t" in rest:
                dialogues[-1].append(rest.split("\t")[1])
    return dialogues


@pytest.fixture(scope="module")
def pairs() -> tuple[list[list[str]], list[list[str]]]:
    """(hyp tokens, ref tokens): >= 2000 cross-dialogue pairs + identical + empty + long-hypothesis cases."""
    dialogues = _read_dialogues(shared_file("data/personachat/valid_self_original.txt"))
    assert len(dialogues) == 1000
    hyps, refs = [], []
    for d in range(300):  # response t of dialogue d vs response t of dialogue d+1 (a different dialogue)
        other = dialogues[d + 1]
        for t, resp in enumerate(dialogues[d]):
            hyps.append(resp)
            refs.append(other[t % len(other)])
    assert len(hyps) >= 2000
    rng = random.Random(0)
    picked = rng.sample(hyps, 60)
    hyps += picked
    refs += picked  # identical pairs
    hyps += ["", "", "ok", "yes ."]
    refs += [picked[0], "", picked[1], picked[2]]  # empty hypothesis / both empty / hyps shorter than n
    hyps += [picked[3], picked[4]]
    refs += ["", ""]  # empty references
    hyps += [picked[5] + " " + picked[6] + " " + picked[7]]
    refs += [picked[5]]  # hypothesis longer than the reference
    tok = M.metric_tokens
    return [tok(h) for h in hyps], [tok(r) for r in refs]


def nltk_bleu(hyps, refs, n):
    """nltk's corpus_bleu with uniform weights 1/n (BLEU-n), default smoothing (none)."""
    return nltk_bleus(hyps, refs, n)[-1]


def nltk_bleus(hyps, refs, max_n):
    """[BLEU-1, ..., BLEU-max_n] from one nltk call (it accepts a list of weight tuples)."""
    from nltk.translate.bleu_score import corpus_bleu

    weights = [(1.0 / n,) * n for n in range(1, max_n + 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on zero counts
        out = corpus_bleu([[r] for r in refs], hyps, weights=weights)
    return out if max_n > 1 else [out]


def sacre_bleu(hyps, refs, n):
    import sacrebleu

    bleu = sacrebleu.BLEU(tokenize="none", smooth_method="none", max_ngram_order=n, force=True)
    return bleu.corpus_score([" ".join(h) for h in hyps], [[" ".join(r) for r in refs]]).score / 100


class _SplitTokenizer:
    """rouge-score tokenizer that keeps our tokens: we join them with spaces, it splits them back."""

    def tokenize(self, text):
        return text.split()


def rouge_score_f(hyps, refs) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_SplitTokenizer())
    # rouge-score's signature is score(target, prediction): the reference goes first
    return [scorer.score(" ".join(r), " ".join(h))["rougeL"].fmeasure for h, r in zip(hyps, refs)]


# ---------------------------------------------------------------------------------------------- tokens


def test_metric_tokens_english():
    assert M.metric_tokens("Hello, World!! I'm 25 -- ok?") == [
        "hello", ",", "world", "!", "!", "i", "'", "m", "25", "-", "-", "ok", "?"]
    assert M.metric_tokens("  i am good , i just got off work .  ") == [
        "i", "am", "good", ",", "i", "just", "got", "off", "work", "."]
    assert M.metric_tokens("") == []


def test_metric_tokens_chinese():
    assert M.metric_tokens("我喜欢NBA比赛，你呢？", "zh") == [
        "我", "喜", "欢", "nba", "比", "赛", "，", "你", "呢", "？"]
    with pytest.raises(ValueError, match="unknown lang"):
        M.metric_tokens("x", "fr")


# ---------------------------------------------------------------------------------------------- BLEU


def test_bleu_equals_nltk_on_real_pairs(pairs):
    hyps, refs = pairs
    ours = M.corpus_bleu(hyps, refs, max_n=4)
    theirs = nltk_bleus(hyps, refs, 4)
    for n in range(1, 5):
        assert abs(ours[n - 1] - theirs[n - 1]) < TOL, n
    assert ours[0] > 0.05 and ours[3] > 0  # a meaningful, non-degenerate case


def test_bleu_equals_sacrebleu_on_real_pairs(pairs):
    hyps, refs = pairs
    ours = M.corpus_bleu(hyps, refs, max_n=4, compat="sacrebleu")
    for n in range(1, 5):
        assert abs(ours[n - 1] - sacre_bleu(hyps, refs, n)) < TOL, n


def test_bleu_nltk_and_sacrebleu_agree_without_short_hypotheses(pairs):
    hyps, refs = zip(*[(h, r) for h, r in zip(*pairs) if len(h) >= 4])
    ours = M.corpus_bleu(list(hyps), list(refs))
    theirs = nltk_bleus(hyps, refs, 4)
    for n in range(1, 5):
        assert abs(ours[n - 1] - sacre_bleu(hyps, refs, n)) < TOL
        assert abs(ours[n - 1] - theirs[n - 1]) < TOL


def test_bleu_strings_equal_tokens():
    hyps = ["I am good, thanks!", "i like dogs ."]
    refs = ["i am fine , thanks !", "I like cats."]
    toks = M.corpus_bleu([M.metric_tokens(h) for h in hyps], [M.metric_tokens(r) for r in refs])
    assert M.corpus_bleu(hyps, refs) == toks


def test_bleu_hand_computed_and_argument_order():
    # hyp shorter than ref: p1 = 2/2, BP = exp(1 - 4/2) -> BLEU-1 = e^-1
    assert M.corpus_bleu(["a b"], ["a b c d"], max_n=1)[0] == pytest.approx(math.exp(-1), abs=1e-12)
    # swapped arguments give precision 2/4 and no penalty: a different number (the paper authors' mistake)
    assert M.corpus_bleu(["a b c d"], ["a b"], max_n=1)[0] == pytest.approx(0.5, abs=1e-12)
    # hyp longer than ref: BP = 1, p1 = 3/6, p2 = 2/5
    b = M.corpus_bleu(["a b c d e f"], ["a b c"], max_n=2)
    assert b == pytest.approx([0.5, math.sqrt(0.5 * 0.4)], abs=1e-12)
    assert abs(b[1] - nltk_bleu([list("abcdef")], [list("abc")], 2)) < TOL
    # clipping: "the the the" vs "the cat": 1 match out of 3
    assert M.corpus_bleu(["the the the"], ["the cat"], max_n=1)[0] == pytest.approx(1 / 3, abs=1e-12)


def test_bleu_identical_is_one(pairs):
    long_ones = [h for h in pairs[0] if len(h) >= 4][:200]
    assert M.corpus_bleu(long_ones, long_ones) == pytest.approx([1.0] * 4, abs=1e-12)


def test_bleu_zero_counts_and_empty():
    # no bigram match: BLEU-2.. are exactly 0, BLEU-1 is not; nltk gives ~1e-154 there
    b = M.corpus_bleu(["b a"], ["a b"], max_n=4)
    assert b[0] == pytest.approx(1.0) and b[1:] == [0.0, 0.0, 0.0]
    assert abs(nltk_bleu([["b", "a"]], [["a", "b"]], 2)) < TOL
    # no unigram match at all
    assert M.corpus_bleu(["x y z"], ["a b c"]) == [0.0] * 4
    # empty hypotheses: BP = 0; empty corpus
    assert M.corpus_bleu(["", ""], ["a b", "c"]) == [0.0] * 4
    assert nltk_bleu([[], []], [["a", "b"], ["c"]], 1) == 0
    assert M.corpus_bleu([], []) == [0.0] * 4


def test_bleu_chinese_equals_nltk():
    path = shared_file("data/zh_samples/Person_Dialog_ZH_test.txt")
    lines = set()
    for line in open(path, encoding="utf-8"):
        for seg in line.strip().split("<|endoftext|>"):
            if seg and seg != "[SEP]":
                lines.add(seg)
    texts = sorted(lines)
    assert len(texts) >= 20
    hyps = [M.metric_tokens(t, "zh") for t in texts]
    refs = hyps[1:] + hyps[:1]
    assert all(len(t) == 1 for h in hyps for t in h if not t.isascii())  # character level
    ours = M.corpus_bleu(hyps, refs, max_n=2)
    assert max(abs(a - b) for a, b in zip(ours, nltk_bleus(hyps, refs, 2))) < TOL
    assert ours[0] > 0
    assert abs(M.rouge_l(texts, texts[1:] + texts[:1], lang="zh") -
               sum(rouge_score_f(hyps, refs)) / len(hyps)) < TOL


def test_bleu_bad_input():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        M.corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="single str"):
        M.corpus_bleu("a b", "a b")
    with pytest.raises(TypeError, match=r"hypotheses\[1\]"):
        M.corpus_bleu(["a", 3], ["a", "b"])
    with pytest.raises(ValueError, match="compat"):
        M.corpus_bleu(["a"], ["a"], compat="moses")


# ---------------------------------------------------------------------------------------------- ROUGE-L


def _lcs_dp(a, b):
    """Textbook O(len(a) len(b)) dynamic programme, the reference for the bit-parallel version."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_lcs_length_equals_dp():
    rng = random.Random(1)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 90))]  # > 64 tokens: several machine words
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 90))]
        assert M.lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l_equals_rouge_score_on_real_pairs(pairs):
    hyps, refs = pairs
    theirs = rouge_score_f(hyps, refs)
    ours = M.rouge_l_scores(hyps, refs)
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < TOL
    assert abs(M.rouge_l(hyps, refs) - sum(theirs) / len(theirs)) < TOL
    assert M.rouge_l(hyps, refs) > 0.05


def test_rouge_l_hand_computed_and_beta():
    # LCS("a b c d", "a c e") = 2: P = 2/4, R = 2/3
    p, r = 0.5, 2 / 3
    assert M.rouge_l(["a b c d"], ["a c e"]) == pytest.approx(2 * p * r / (p + r), abs=1e-12)
    b2 = 1.2**2
    assert M.rouge_l(["a b c d"], ["a c e"], beta=1.2) == pytest.approx((1 + b2) * p * r / (r + b2 * p), abs=1e-12)
    assert M.rouge_l_scores(["", "a", ""], ["a", "", ""]) == [0.0, 0.0, 0.0]
    assert M.rouge_l([], []) == 0.0


# ---------------------------------------------------------------------------------------------- diversity


def test_entropy_and_distinct_hand_computed():
    hyps = ["a b a", "b c"]
    # unigrams a:2 b:2 c:1 of 5
    h1 = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
    assert M.ngram_entropy(hyps, 1) == pytest.approx(h1, abs=1e-12)
    assert M.ngram_entropy(hyps, 1, base=2) == pytest.approx(h1 / math.log(2), abs=1e-12)
    # bigrams (a b) (b a) (b c): uniform over 3; no bigram crosses responses
    assert M.ngram_entropy(hyps, 2) == pytest.approx(math.log(3), abs=1e-12)
    assert M.ngram_entropy(hyps, 3) == 0.0  # a single trigram
    assert M.ngram_entropy(hyps, 4) == 0.0  # none at all
    assert M.distinct_n(hyps, 1) == pytest.approx(3 / 5)
    assert M.distinct_n(hyps, 2) == pytest.approx(1.0)
    assert M.distinct_n(["", ""], 1) == 0.0
    with pytest.raises(ValueError):
        M.ngram_entropy(hyps, 0)


def test_entropy_on_real_responses_equals_direct_formula(pairs):
    hyps = pairs[0][:500]
    for n in range(1, 5):
        grams = [tuple(h[i:i + n]) for h in hyps for i in range(len(h) - n + 1)]
        counts = {}
        for g in grams:
            counts[g] = counts.get(g, 0) + 1
        direct = -sum(c / len(grams) * math.log(c / len(grams)) for c in counts.values())
        assert M.ngram_entropy(hyps, n) == pytest.approx(direct, abs=1e-9)


# ---------------------------------------------------------------------------------------------- persona coverage


def test_persona_coverage_hand_computed():
    personas = ["i have two dogs .", "my favorite music is country ."]
    # data.content_words: {two, dog} and {music, country} ("favorite" is a stop word, "dogs" -> "dog")
    responses = [
        "i love my two dogs !",  # {two, dog}: covers 2/2 of the first persona sentence
        "country songs are the best",  # {country, song, best}: 1/2 of the second
        "hello , how are you ?",  # only stop words: nothing
    ]
    cov = M.persona_coverage(responses, [personas] * 3)
    assert cov == pytest.approx((1.0 + 1 / 2 + 0.0) / 3, abs=1e-12)
    assert M.persona_coverage(["anything"], [[]]) == 0.0
    # Chinese: non-stop characters and their adjacent bigrams. Persona {养, 只, 小, 狗, 只小, 小狗} (我/了/一 are
    # stop characters); response {小, 狗, 可, 爱, 小狗, 可爱}: 3 of 6.
    assert M.persona_coverage(["我的小狗很可爱"], [["我养了一只小狗。"]], lang="zh") == pytest.approx(3 / 6)
    with pytest.raises(ValueError):
        M.persona_coverage(["a"], [])
    with pytest.raises(TypeError, match="list of persona sentences"):
        M.persona_coverage(["a"], ["i have a dog"])


# ---------------------------------------------------------------------------------------------- diagnostics (issue 14)


def test_verbatim_copy_hand_computed():
    persona = "i love to meet new people ."  # content words in order: meet, new, peopl ("people" -> "peopl")
    assert M.is_verbatim_copy("yes ! i love to meet new people .", persona)
    assert M.is_verbatim_copy("i meet so many new and interesting people at work", persona)  # gaps allowed
    assert not M.is_verbatim_copy("new people are fun to meet", persona)  # same words, another order
    assert not M.is_verbatim_copy("i love to meet people", persona)  # "new" is missing
    # one content word ("dog") is a topic, not a copied sentence: never a copy
    assert not M.is_verbatim_copy("i have a dog", "i have a dog .")
    assert M.is_verbatim_copy("i drive a ford pickup truck", "i drive a ford pickup truck .")
    personas = ["i love to meet new people .", "i drive a ford pickup truck ."]
    replies = ["i love to meet new people .", "my truck is a ford", "i drive my ford pickup truck to work",
               "hello"]
    assert M.verbatim_copy_rate(replies, [personas] * 4) == pytest.approx(2 / 4)
    assert M.verbatim_copy_rate([], []) == 0.0
    with pytest.raises(ValueError):
        M.verbatim_copy_rate(["a"], [])
    # Chinese: non-stop characters in order (我/喜欢 are stop characters): 猫, 狗
    assert M.is_verbatim_copy("我家有猫，也有狗。", "我喜欢猫和狗。", min_words=2)
    assert not M.is_verbatim_copy("狗和猫都好。", "我喜欢猫和狗。")


def test_mean_words_hand_computed():
    # "hello , world ! !" -> 2 words; "i ' m 25 years old ." -> i, m, 25, years, old = 5 words
    assert M.mean_words(["Hello, world!!", "i'm 25 years old ."]) == pytest.approx(3.5)
    assert M.mean_words(["我喜欢猫。"], lang="zh") == pytest.approx(4.0)  # one word per character, "。" is not
    assert M.mean_words([]) == 0.0


def test_selection_diagnostics_hand_computed():
    picks = ["a", "a", None, "b", "b"]
    labels = ["a", "b", None, "b", None]
    dialogues = [1, 1, 1, 2, 2]
    # consecutive pairs inside a dialogue: (a, a) (a, None) | (b, b) -> 2 of 3 keep the same persona
    # no persona picked: 1 of 5; labelled rows (a, a) (a, b) (b, b): 2 of 3 right
    d = M.selection_diagnostics(picks, labels, dialogues)
    assert d == {"same_persona": pytest.approx(2 / 3), "no_persona": pytest.approx(1 / 5),
                 "select_acc": pytest.approx(2 / 3)}
    # the gold yardstick: labels against themselves; pairs (a, b) (b, None) | (b, None) never repeat
    g = M.selection_diagnostics(labels, labels, dialogues)
    assert g == {"same_persona": 0.0, "no_persona": pytest.approx(2 / 5), "select_acc": 1.0}
    assert M.selection_diagnostics([], [], []) == {"same_persona": None, "no_persona": None, "select_acc": None}


def _row(dialogue, response, gold, selected, gold_persona, personas=("i love to meet new people .",)):
    return {"dialogue_id": dialogue, "personas": list(personas), "response": response, "gold": gold,
            "selection_output": selected or "No persona sentence applies.", "selected_persona": selected,
            "gold_persona": gold_persona}


def test_diagnostics_of_rows_and_gold_yardstick():
    p = "i love to meet new people ."
    rows = [_row(0, "i love to meet new people .", "hi , how are you today ?", p, None),
            _row(0, "i love to meet new people .", "i meet new people every day at work", p, p)]
    d = M.diagnostics(rows)
    assert d["copy_rate"] == 1.0 and d["gold"]["copy_rate"] == pytest.approx(1 / 2)
    assert d["words"] == pytest.approx(6.0)  # i love to meet new people
    assert d["gold"]["words"] == pytest.approx((5 + 8) / 2)
    assert d["distinct1"] == pytest.approx(7 / 14)  # the same 7 tokens (with ".") twice
    assert d["same_persona"] == 1.0 and d["no_persona"] == 0.0 and d["select_acc"] == 1.0
    assert d["gold"]["same_persona"] == 0.0 and d["gold"]["no_persona"] == pytest.approx(1 / 2)
    # a run without a selection step (Not Select) has no selection diagnostics, the gold side still does
    plain = [{**r, "selection_output": None, "selected_persona": None} for r in rows]
    d = M.diagnostics(plain)
    assert d["same_persona"] is None and d["no_persona"] is None and d["select_acc"] is None
    assert d["gold"]["no_persona"] == pytest.approx(1 / 2)
    # and score_generations carries them into results.json, with the table showing the gold row first
    res = M.score_generations(rows, "en")
    assert res["copy_rate"] == 1.0 and res["gold"]["copy_rate"] == pytest.approx(1 / 2)
    table = M.results_table([("pal", res)])
    assert "| gold responses | 50.0 |" in table and "| pal | 100.0 |" in table


def test_early_stopping_score_does_not_reward_parroting():
    persona = "i love to meet new people ."
    copy = [{"dialogue_id": 0, "personas": [persona], "response": persona, "gold": "hi , how are you ?",
             "selection_output": "1", "selected_persona": persona, "gold_persona": None}]
    s = M.validation_score(copy, "en")
    # coverage 100 (meet, new, peopl all said), BLEU-1 0 (no word of the gold), one copy in one reply: 100 + 0 - 100
    assert s["persona_coverage"] == pytest.approx(100) and s["bleu1"] == 0 and s["score"] == pytest.approx(0)
    fair = [{**copy[0], "response": "hi , how are you ?"}]  # the gold itself: BLEU-1 100, no persona words
    assert M.validation_score(fair, "en")["score"] == pytest.approx(100)
