"""pal.py's stages wired together, checked against references rather than against numbers the code produced.

The model's generate is replaced by a scripted stand-in (it answers each prompt by what the prompt is: a
selection prompt gets a number chosen here, a persona-less prompt and a generation prompt get a reply naming the
example), dpo.train by a recorder; every stage then runs for real through pal.main:
  - predict highlights exactly the persona the model's own selection output names, never the gold one, and
    writes those picks to generations.jsonl (so does DPO's validation pass, through the same function);
  - pairs samples each rejected reply from a history-only prompt; DPO trains chosen and rejected behind one
    and the same persona-enhanced prompt with the gold persona highlighted;
  - evaluate's BLEU-1/2/4 and ROUGE-L equal nltk's and rouge-score's on rows written by hand.
"""
import json
import re

import pytest
# the fixtures tiny_model_dir and data_dir come from conftest.py
from conftest import _args, _Recorder

import data
import pal

LIMIT = 6
MAX_NEW, SELECT_MAX_NEW = 16, 8
EXTRA = ["--limit", str(LIMIT), "--max-len", "512", "--max-new-tokens", str(MAX_NEW),
         "--select-max-new-tokens", str(SELECT_MAX_NEW), "--eval-limit", str(LIMIT)]

# What the "model" answers to the selection prompt of each example, keyed by (split, position). Every labelled
# example gets a pick other than its gold sentence, so a gold persona showing up highlighted is a leak.
SELECT_ANSWERS = {
    ("test", 0): "2",            # gold: sentence 1 -> sentence 2
    ("test", 1): "3",            # unlabelled -> sentence 3 (the "no persona" gold is not highlighted)
    ("test", 2): "0",            # "none applies"
    ("test", 3): "???",          # garbage -> none
    ("test", 4): "4 because",    # a leading number counts: sentence 4 (gold: sentence 2)
    ("test", 5): "9",            # out of range -> none
    ("valid2", 0): "1",          # DPO validation (Valid#2); gold labels 1, 0, 0, 2, 3, None
    ("valid2", 1): "2",
    ("valid2", 2): "0",
    ("valid2", 3): "4",
    ("valid2", 4): "3",
    ("valid2", 5): "1",
}
GENERATE_MARK = "Keep this in mind for your reply: "


def expected_pick(answer: str, personas: list[str]) -> str | None:
    """The documented reading of a selection output: a leading number k picks the k-th sentence; 0, a number
    out of range or text matching no sentence means no persona."""
    m = re.match(r"\s*(\d+)", answer)
    k = int(m.group(1)) if m else 0
    return personas[k - 1] if 1 <= k <= len(personas) else None


def conversation_lines(prompt: str) -> list[str]:
    """The utterances of a prompt's (last) Conversation block, speaker labels removed."""
    block = re.findall(r"Conversation:\n(.*?)\n\n", prompt, re.S)[-1]
    return [re.sub(r"^(Partner|You): ", "", line) for line in block.split("\n")]


def highlighted(prompt: str) -> str:
    (line,) = re.findall(re.escape(GENERATE_MARK) + r"(.*)\n", prompt)
    return line


class ScriptedGenerate:
    """Stands in for model.generate: decodes each prompt, recognises its kind and its example (by the last
    utterance of its conversation), and returns the token ids of a scripted reply. Records every call."""

    def __init__(self, tok, examples: dict):
        self.tok, self.examples, self.calls, self.stage = tok, examples, [], None

    def __call__(self, model, prompts, max_new_tokens, stop_ids=None):
        out = []
        for ids in prompts:
            text = self.tok.decode(list(ids))
            key = self.examples_key(text)
            if "Which single sentence" in text:
                kind, reply = "select", SELECT_ANSWERS[key]
            elif GENERATE_MARK in text:
                kind, reply = "generate", f"generated reply {key[0]} {key[1]}"
            elif text.startswith("Continue the conversation below") and "About you" not in text:
                kind, reply = "history", f"history reply {key[0]} {key[1]}"
            else:
                kind, reply = "other", "unexpected prompt"
            reply_ids = self.tok.encode(reply)
            assert len(reply_ids) <= max_new_tokens, (reply, max_new_tokens)  # a real model could say no more
            assert not set(reply_ids) & set(stop_ids or []), reply
            self.calls.append({"stage": self.stage, "kind": kind, "key": key, "prompt": text,
                               "max_new_tokens": max_new_tokens, "reply": reply})
            out.append(reply_ids)
        return out

    def examples_key(self, prompt: str):
        last = conversation_lines(prompt)[-1]
        (key,) = [k for k, e in self.examples.items() if e.history and e.history[-1] == last]
        return key

    def of(self, stage, kind=None):
        return [c for c in self.calls if c["stage"] == stage and (kind is None or c["kind"] == kind)]


class ValidatingRecorder(_Recorder):
    """dpo.train's recorder that also runs DPO's validation callback once, as training would."""

    def __call__(self, model, cfg, feats, collate, eval_fn=None, **kw):
        if cfg.mode == "dpo" and eval_fn is not None:
            self.scores = eval_fn(model)
        return super().__call__(model, cfg, feats, collate, eval_fn=eval_fn, **kw)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir, data_dir):
    """Every stage of a PAL run, one pal.main call each, with scripted generation and recorded training."""
    splits, _ = pal.load_data(data_dir, limit=LIMIT)
    examples = {(s, i): e for s in ("valid1", "valid2", "test") for i, e in enumerate(splits[s])}
    lasts = [e.history[-1] for e in examples.values()]
    assert len(set(lasts)) == len(lasts), "the stub tells examples apart by their last utterance"
    tok = pal.load_tokenizer(str(tiny_model_dir))
    gen, rec = ScriptedGenerate(tok, examples), ValidatingRecorder()
    run = tmp_path_factory.mktemp("wiring") / "run"
    args = _args(run, tiny_model_dir, data_dir, *EXTRA)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pal.modeling, "generate", gen)
        mp.setattr(pal.dpo, "train", rec)
        for stage in ("sft", "pairs", "dpo", "predict", "evaluate"):
            gen.stage = stage
            pal.main([stage, *args])
    return {"run": run, "gen": gen, "rec": rec, "tok": tok, "splits": splits, "examples": examples}


# ---- 1. Select then Generate --------------------------------------------------------------------------------

def _check_selection_then_generation(p, stage: str, split: str):
    """The stage's prompts for `split`: one selection and one generation prompt per example, the generation
    prompt highlighting exactly what the selection answer names; returns {example key: highlighted text}."""
    gen, examples = p["gen"], p["examples"]
    selects, generates = gen.of(stage, "select"), gen.of(stage, "generate")
    assert not gen.of(stage, "other") and not gen.of(stage, "history")
    wanted = sorted(k for k in examples if k[0] == split)
    assert sorted(c["key"] for c in selects) == wanted and sorted(c["key"] for c in generates) == wanted
    assert all(c["max_new_tokens"] == SELECT_MAX_NEW for c in selects)
    assert all(c["max_new_tokens"] == MAX_NEW for c in generates)
    shown = {}
    for c in selects:  # the number answered refers to the selection prompt's own numbered list
        e = examples[c["key"]]
        assert all(f"{k}. {s}\n" in c["prompt"] for k, s in enumerate(e.personas, 1)), c["prompt"]
    for c in generates:
        e = examples[c["key"]]
        pick = expected_pick(SELECT_ANSWERS[c["key"]], e.personas)
        shown[c["key"]] = highlighted(c["prompt"])
        assert shown[c["key"]] == (pick if pick is not None else data.NO_PERSONA["en"]), c["key"]
        gold = e.personas[e.persona_label] if e.persona_label is not None else data.NO_PERSONA["en"]
        if pick is not None or e.persona_label is not None:  # picks were scripted away from the gold label ...
            assert gold != shown[c["key"]] and gold not in shown[c["key"]]  # ... so gold must not be highlighted
    return shown


def test_predict_highlights_the_models_own_pick_never_the_gold(pipeline):
    shown = _check_selection_then_generation(pipeline, "predict", "test")
    assert sum(v == data.NO_PERSONA["en"] for v in shown.values()) == 3  # "0", "???", "9"
    rows = pal.read_jsonl(pipeline["run"] / "generations.jsonl")
    test = pipeline["splits"]["test"]
    assert len(rows) == len(test) == LIMIT
    for i, (row, e) in enumerate(zip(rows, test)):  # in Test order, each row its own example's
        answer = SELECT_ANSWERS[("test", i)]
        assert row["history"] == e.history and row["personas"] == e.personas and row["gold"] == e.response
        assert row["selection_output"] == answer
        assert row["selected_persona"] == expected_pick(answer, e.personas)
        assert row["response"] == f"generated reply test {i}"
        assert row["gold_persona"] == (e.personas[e.persona_label] if e.persona_label is not None else None)
    res = json.loads((pipeline["run"] / "results.json").read_text())
    assert res["n"] == LIMIT
    labelled = [i for i, e in enumerate(test) if e.persona_label is not None]
    assert labelled and res["select_acc"] == 0.0  # every labelled pick differs from gold
    assert res["no_persona"] == pytest.approx(3 / LIMIT)


def test_dpo_validation_selects_and_generates_the_same_way(pipeline):
    _check_selection_then_generation(pipeline, "dpo", "valid2")
    assert "score" in pipeline["rec"].scores


def test_no_inference_prompt_highlights_a_gold_persona_it_did_not_pick(pipeline):
    """Over every generation prompt of the run: the highlighted sentence is the one picked for that example."""
    gen = pipeline["gen"]
    inference = [c for c in gen.calls if c["kind"] == "generate"]
    assert {c["stage"] for c in inference} == {"dpo", "predict"}
    assert {c["stage"] for c in gen.calls} == {"pairs", "dpo", "predict"}  # sft and evaluate generate nothing
    for c in inference:
        e = pipeline["examples"][c["key"]]
        pick = expected_pick(SELECT_ANSWERS[c["key"]], e.personas)
        assert highlighted(c["prompt"]) == (pick or data.NO_PERSONA["en"])


# ---- 2. pairs and DPO ---------------------------------------------------------------------------------------

def test_pairs_rejected_come_from_history_only_prompts(pipeline):
    gen, valid1 = pipeline["gen"], pipeline["splits"]["valid1"]
    calls = gen.of("pairs")
    assert [c["kind"] for c in calls] == ["history"] * LIMIT
    assert sorted(c["key"] for c in calls) == [("valid1", i) for i in range(LIMIT)]
    for c in calls:
        e = pipeline["examples"][c["key"]]
        assert conversation_lines(c["prompt"]) == e.history  # the whole history (max-len 512: nothing dropped)
        assert not any(p in c["prompt"] for p in e.personas)
        assert not any(p.rstrip(".") in c["prompt"] for p in e.personas)
        assert "About you" not in c["prompt"] and GENERATE_MARK not in c["prompt"]
        assert c["max_new_tokens"] == MAX_NEW
    rows = pal.read_jsonl(pipeline["run"] / "pairs.jsonl")
    assert len(rows) == len(valid1) == LIMIT
    for i, (row, e) in enumerate(zip(rows, valid1)):
        assert row["chosen"] == e.response
        assert row["rejected"] == f"history reply valid1 {i}"  # what the history-only prompt of this example got
        assert row["personas"] == e.personas and row["history"] == e.history
        assert row["persona_label"] == e.persona_label


def _prompt_len(labels):
    n = next(i for i, v in enumerate(labels) if v != -100)
    assert all(v != -100 for v in labels[n:])
    return n


def test_dpo_pairs_share_the_persona_enhanced_prompt(pipeline):
    tok, valid1 = pipeline["tok"], pipeline["splits"]["valid1"]
    (call,) = [c for c in pipeline["rec"].calls if c["mode"] == "dpo"]
    feats = call["feats"]
    assert len(feats) == LIMIT
    by_response = {e.response: i for i, e in enumerate(valid1)}
    seen = set()
    for f in feats:
        n = _prompt_len(f["chosen_labels"])
        assert _prompt_len(f["rejected_labels"]) == n
        assert f["chosen_input_ids"][:n] == f["rejected_input_ids"][:n]
        for side in ("chosen", "rejected"):
            ids, labels = f[f"{side}_input_ids"], f[f"{side}_labels"]
            assert len(ids) == len(labels) and labels[n:] == ids[n:]
            assert ids[-1] in tok.stop_ids  # each target ends with EOS
        chosen = tok.decode(f["chosen_input_ids"][n:-1])
        rejected = tok.decode(f["rejected_input_ids"][n:-1])
        i = by_response[chosen]  # chosen = an example's gold response ...
        assert rejected == f"history reply valid1 {i}"  # ... rejected = that example's persona-less reply
        e = valid1[i]
        prompt = tok.decode(f["chosen_input_ids"][:n])
        gold = e.personas[e.persona_label] if e.persona_label is not None else data.NO_PERSONA["en"]
        assert prompt == data.build_prompt("generate", e.personas, e.history, "en", persona=gold)
        assert highlighted(prompt) == gold
        assert all(f"- {p}\n" in prompt for p in e.personas)
        seen.add(i)
    assert seen == set(range(LIMIT))


# ---- 3. evaluate --------------------------------------------------------------------------------------------

EVAL_ROWS = [  # (response, gold): short replies against longer golds, so swapping the two changes BLEU
    ("I have a dog.", "i have a big dog and a cat, they're home-made!"),
    ("what kind of dogs do you have ?", "What kind of dogs do you have?"),
    ("i love reading .", "i love reading . i have a big library at my house ."),
    ("sorry to hear that", "i am sorry to hear that . what happened"),
    ("Tea_time is my favourite time", "i love to drink fancy tea ."),
]


def _ref_tokens(text: str) -> list[str]:
    """pal's metric tokens for ASCII text, written out independently: lower-case; runs of letters/digits, and
    every other visible character alone."""
    return re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower())


class _Tokenizer:  # rouge-score's tokenizer interface
    def tokenize(self, text):
        return _ref_tokens(text)


def test_evaluate_matches_nltk_and_rouge_score(tmp_path, tiny_model_dir):
    from nltk.translate.bleu_score import corpus_bleu
    from rouge_score import rouge_scorer

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dir)}))
    personas = ["i love to drink fancy tea.", "i have a big library at home."]
    rows = [{"dialogue_id": 7, "personas": personas, "history": ["hi"], "selection_output": "1",
             "selected_persona": personas[0], "response": h, "gold": g, "gold_persona": personas[0]}
            for h, g in EVAL_ROWS]
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pal.main(["evaluate", "--run-dir", str(run), "--trust-outputs"])  # made by hand: no stages.json
    res = json.loads((run / "results.json").read_text())

    hyps = [_ref_tokens(h) for h, _ in EVAL_ROWS]
    refs = [_ref_tokens(g) for _, g in EVAL_ROWS]

    def bleu(h, r, n):
        return corpus_bleu([[x] for x in r], h, weights=(1 / n,) * n)

    for n in (1, 2, 4):
        assert bleu(hyps, refs, n) > 0.05
        if n < 4:  # the order matters on these rows (BLEU-4 happens to come out close either way)
            assert abs(bleu(refs, hyps, n) - bleu(hyps, refs, n)) > 0.1 * bleu(hyps, refs, n)
        assert res[f"bleu{n}"] == pytest.approx(100 * bleu(hyps, refs, n), rel=1e-9), n
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    f = [scorer.score(g, h)["rougeL"].fmeasure for h, g in EVAL_ROWS]  # score(target, prediction)
    assert res["rouge_l"] == pytest.approx(100 * sum(f) / len(f), rel=1e-9)
    assert res["n"] == len(EVAL_ROWS) and res["lang"] == "en"
