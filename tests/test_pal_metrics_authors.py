"""The authors' metric convention (results.json metrics.authors): BLEU and ROUGE-L as their decode.py got them from
pycocoevalcap (the oracle here, called as they called it: gts = the generated replies, res = the gold responses),
and their Distinct-n / entropy definitions, hand-computed."""
import json
import math
import random

import pytest

import pal

pycoco_bleu = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="pycocoevalcap (tests/run.sh installs it)")
pycoco_rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")

WORDS = ["I", "i", "like", "dogs", "Dogs", "my", "cat", "is", "nice", ",", ".", "!", "you", "what", "do", "work"]


def _texts(rng, n):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_and_rouge_equal_pycocoevalcap_called_as_the_authors_did(seed):
    rng = random.Random(seed)
    replies, golds = _texts(rng, 40), _texts(rng, 40)
    gts = {i: [h] for i, h in enumerate(replies)}  # decode.py: gts=generated_dict, res=reference_dict
    res = {i: [g] for i, g in enumerate(golds)}
    bleu, _ = pycoco_bleu.Bleu(4).compute_score(gts=gts, res=res, verbose=0)
    rouge, _ = pycoco_rouge.Rouge().compute_score(gts=gts, res=res)
    ours = pal.authors_metrics(replies, golds)
    assert [ours["bleu1"], ours["bleu2"], ours["bleu4"]] == pytest.approx([100 * bleu[0], 100 * bleu[1],
                                                                           100 * bleu[3]], rel=1e-9)
    assert ours["rouge_l"] == pytest.approx(100 * rouge, rel=1e-9)
    # and the order matters: with the arguments the right way round the numbers differ
    assert pal.authors_metrics(golds, replies)["rouge_l"] != pytest.approx(ours["rouge_l"], rel=1e-6)


def test_distinct_divides_by_tokens_and_entropy_uses_their_tokens():
    replies = ["Hi, hi!", "hi there"]
    # their tokens: "Hi , hi !" -> [Hi, ",", hi, "!"]; "hi there" -> [hi, there]: 6 tokens, case kept
    ours = pal.authors_metrics(replies, ["x", "y"])
    assert ours["distinct1"] == pytest.approx(5 / 6)  # Hi , hi ! there
    assert ours["distinct2"] == pytest.approx(4 / 6)  # (Hi ,) (, hi) (hi !) (hi there): divided by tokens
    counts = [1, 1, 2, 1, 1]  # Hi , hi ! there
    h1 = -sum(c / 6 * math.log(c / 6) for c in counts)
    assert ours["entropy1"] == pytest.approx(h1)


def test_evaluate_writes_the_authors_convention_as_pycocoevalcap_scores_it(tmp_path):
    replies, golds = ["i like dogs .", "What do you do ?"], ["I like my dogs", "what do you do for work ?"]
    rows = [{"response": r, "gold": g, "personas": ["i like dogs ."], "history": ["hi"], "dialogue_id": k,
             "selected_persona": None, "selection_output": None, "gold_persona": None}
            for k, (r, g) in enumerate(zip(replies, golds))]
    (tmp_path / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pal.stage_evaluate(pal.RunConfig(model="gpt2"), tmp_path)
    res = pal.read_json(tmp_path / "results.json")
    bleu, _ = pycoco_bleu.Bleu(4).compute_score(gts=dict(enumerate([[r] for r in replies])),
                                                res=dict(enumerate([[g] for g in golds])), verbose=0)
    assert res["metrics"]["authors"]["bleu1"] == pytest.approx(100 * bleu[0], rel=1e-9)
    assert res["metrics"]["default"]["bleu1"] == res["bleu1"] != res["metrics"]["authors"]["bleu1"]
