"""C.score as the PAL paper's numbers were computed (max over persona sentences, premise = persona sentence,
hypothesis = response) and as Madotto et al. (2019) define it (sum), from one NLI pass."""
import pytest

# FakeNLI: known outputs by (premise, hypothesis), every call recorded; C, NEU, E: contradiction, neutral, entailment
from conftest import C, E, NEU, FakeNLI

import nli as N

PERSONAS_A = ["i have two dogs .", "i like to ski .", "i am a nurse ."]
PERSONAS_B = ["i hate the snow .", "i am vegan ."]
RESPONSES = ["my dogs are great", "i love steak", "hello"]
PERSONAS = [PERSONAS_A, PERSONAS_B, PERSONAS_B]
# keyed (premise, hypothesis) = (persona sentence, response): the swapped order raises KeyError in the stub
TABLE = {
    (PERSONAS_A[0], RESPONSES[0]): E, (PERSONAS_A[1], RESPONSES[0]): NEU, (PERSONAS_A[2], RESPONSES[0]): C,
    (PERSONAS_B[0], RESPONSES[1]): NEU, (PERSONAS_B[1], RESPONSES[1]): C,
    (PERSONAS_B[0], RESPONSES[2]): C, (PERSONAS_B[1], RESPONSES[2]): [0.34, 0.33, 0.33],
}
# per response: values (+1, 0, -1) -> max, sum
#   "my dogs are great": (+1, 0, -1) -> 1, 0
#   "i love steak":      (0, -1)     -> 0, -1
#   "hello":             (-1, -1)    -> -1, -2
WANT_MAX, WANT_SUM = [1.0, 0.0, -1.0], [0.0, -1.0, -2.0]


def test_c_scores_max_and_sum_in_one_pass():
    stub = FakeNLI(TABLE)
    out = N.c_scores(RESPONSES, PERSONAS, stub)
    assert out["per_response_max"] == WANT_MAX and out["per_response_sum"] == WANT_SUM
    assert out["c_score"] == pytest.approx((1 + 0 - 1) / 3)
    assert out["c_score_sum"] == pytest.approx((0 - 1 - 2) / 3)
    assert len(stub.calls) == 1  # one NLI pass for both numbers


def test_c_score_premise_is_persona_hypothesis_is_response():
    stub = FakeNLI(TABLE)
    N.c_score(RESPONSES, PERSONAS, stub)
    premises, hypotheses = stub.calls[0]
    assert len(premises) == len(hypotheses) == 7
    assert all(p in PERSONAS_A + PERSONAS_B for p in premises)
    assert all(h in RESPONSES for h in hypotheses)
    assert set(zip(premises, hypotheses)) == set(TABLE)  # every (persona sentence, its response) pair, once


def test_c_score_default_is_max_and_sum_on_request():
    stub = FakeNLI(TABLE)
    assert N.c_score(RESPONSES, PERSONAS, stub) == pytest.approx(0.0)
    assert N.c_score(RESPONSES, PERSONAS, stub, return_per_response=True)[1] == WANT_MAX
    score, per = N.c_score(RESPONSES, PERSONAS, stub, aggregate="sum", return_per_response=True)
    assert per == WANT_SUM and score == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="aggregate"):
        N.c_score(RESPONSES, PERSONAS, stub, aggregate="mean")


def test_c_scores_edge_cases():
    stub = FakeNLI({("p", "x"): E})
    out = N.c_scores(["x", "y"], [["p"], []], stub)  # a response with no persona sentence counts 0 in both
    assert out["per_response_max"] == [1.0, 0.0] and out["per_response_sum"] == [1.0, 0.0]
    assert out["c_score"] == out["c_score_sum"] == pytest.approx(0.5)
    assert N.c_scores([], [], stub)["c_score"] == 0.0
    with pytest.raises(ValueError):
        N.c_scores(["x"], [], stub)
    with pytest.raises(TypeError, match="list of persona sentences"):
        N.c_scores(["x"], ["i have a dog"], stub)
    with pytest.raises(ValueError, match="unavailable"):
        N.c_scores(["x"], [["p"]], None)
