"""Every row of the paper's tables, as `pal.py all --variant X` runs it: what each training stage trains and keeps
frozen, the weights it starts from, the prompts it trains on, and the prompts and weights of inference.

Training is recorded (dpo.train is replaced by a recorder that exports the model untouched) and generation is
scripted (model.generate answers "1" to a selection prompt and a fixed reply otherwise), so each row runs the real
stages, loads and prompts in a few seconds on the tiny GPT-2 of conftest.py (the fixture tiny_model_dir)."""
import json
from pathlib import Path

import pytest
# the fixtures tiny_model_dir and data_dir come from conftest.py
from conftest import _args

import data
import dpo
import model as modeling
import pal

SELECT, REPLY, HISTORY = "Which single sentence", "Write your next reply.", "Continue the conversation"
HIGHLIGHT = "Keep this in mind for your reply:"


class Recorder:
    """Stands in for dpo.train, model.generate and pal.load_stage_model: what was loaded, trained and prompted."""

    def __init__(self, tok):
        self.tok, self.loads, self.trained, self.prompts = tok, [], [], []

    def train(self, model, cfg, feats, collate, eval_fn=None, ref_model=None, export=True, export_files=None):
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        self.trained.append({"mode": cfg.mode, "out": Path(cfg.out_dir), "trainable": trainable,
                             "frozen": sum(not p.requires_grad for p in model.parameters()), "ref": ref_model,
                             "lr": cfg.lr, "prompts": [self.text(f) for f in feats], "feats": feats})
        dpo.export_model(model, Path(cfg.out_dir) / "final", add_files=export_files)
        return {"final_dir": Path(cfg.out_dir) / "final"}

    def text(self, feat: dict) -> tuple[int, str]:
        """(number of virtual ids, the decoded prompt) of a training feature (SFT or DPO's chosen side)."""
        ids, labels = (feat["input_ids"], feat["labels"]) if "input_ids" in feat else \
            (feat["chosen_input_ids"], feat["chosen_labels"])
        n = next(i for i, lab in enumerate(labels) if lab != -100)
        return self.split(ids[:n])

    def split(self, ids) -> tuple[int, str]:
        virtual = sum(i >= self.tok.vocab_size for i in ids)
        assert all(i >= self.tok.vocab_size for i in ids[:virtual]), "virtual ids come first"
        return virtual, self.tok.decode(ids[virtual:])

    def generate(self, model, prompts, max_new_tokens, stop_ids=None):
        out = []
        for ids in prompts:
            virtual, text = self.split(ids)
            self.prompts.append({"virtual": virtual, "text": text, "soft": modeling.soft_prompt_ids(model)})
            out.append(self.tok.encode("1" if SELECT in text else " hello there , friend ."))
        return out

    def load(self, real):
        def load_stage_model(weights, dtype, lora=None, trainable=False, **kw):
            self.loads.append((str(weights), trainable))
            return real(weights, dtype, lora, trainable, **kw)
        return load_stage_model


FEW_SHOT_LIMIT = 16


def run_row(tmp_path, model_dir, data_dir, monkeypatch, variant, *extra):
    tok = data.load_tokenizer(str(model_dir))
    rec = Recorder(tok)
    monkeypatch.setattr(dpo, "train", rec.train)
    monkeypatch.setattr(modeling, "generate", rec.generate)
    monkeypatch.setattr(pal, "load_stage_model", rec.load(pal.load_stage_model))
    run = tmp_path / variant
    # two demonstrations need room, and two Train dialogues to come from (4 examples are one dialogue)
    room = ["--max-len", "1024", "--limit", str(FEW_SHOT_LIMIT)] if variant == "few_shot" else []
    pal.main(["all", *_args(run, model_dir, data_dir, "--variant", variant, "--prompt-tokens", "4", *room, *extra)])
    return run, rec


def stage_of(rec: Recorder, run: Path, name: str) -> list[dict]:
    return [t for t in rec.trained if t["out"].is_relative_to(run / name)]


def inference(rec: Recorder, kind: str) -> list[dict]:
    """The recorded prompts of one kind: pairs (history only), select, reply."""
    return [p for p in rec.prompts if (HISTORY in p["text"]) == (kind == "pairs") and
            (SELECT in p["text"]) == (kind == "select")]


ALL_WEIGHTS = ["h.0.attn.c_attn.bias"]  # one of the GPT-2's parameters: full fine-tuning trains it


@pytest.mark.parametrize("variant", list(pal.VARIANTS))
def test_each_row_trains_freezes_loads_and_prompts_as_the_paper_defines_it(
        tmp_path, tiny_model_dir, data_dir, monkeypatch, variant):
    run, rec = run_row(tmp_path, tiny_model_dir, data_dir, monkeypatch, variant)
    sw = pal.VARIANTS[variant]
    base, sft_final, dpo_final = str(tiny_model_dir), str(run / "sft" / "final"), str(run / "dpo" / "final")
    sft, second = stage_of(rec, run, "sft"), stage_of(rec, run, "dpo")

    # 1. SFT: which tasks, which prompts, what trains, from which weights
    if sw["tasks"] == "none":
        assert sft == [] and not (run / "sft").exists()
    else:
        (t,) = sft
        assert (base, True) in rec.loads or (base, False) in rec.loads  # SFT starts from the base model
        prompts = [p for _, p in t["prompts"]]
        n_select = sum(SELECT in p for p in prompts)
        if variant == "pal" or sw["tasks"] == "mix":  # mixed tasks: selection + persona-enhanced generation
            assert n_select == 4 and sum(HIGHLIGHT in p for p in prompts) == 4
        elif sw["tasks"] == "ps":  # selection only
            assert n_select == len(prompts) == 4
        elif sw["fmt"] == "plain":  # fine-tuning without prompts: personas and history as lines
            assert n_select == 0 and all(REPLY not in p and HIGHLIGHT not in p for p in prompts)
        elif sw["tasks"] == "dg":  # only DG: PAL's persona-enhanced generation alone, the gold persona highlighted
            assert n_select == 0 and len(prompts) == 4 and all(HIGHLIGHT in p for p in prompts)
        else:  # generation only, from the persona list: no highlight, never the "no persona" sentence
            assert n_select == 0 and all(REPLY in p and HIGHLIGHT not in p and data.NO_PERSONA["en"] not in p
                                         for p in prompts)
        if variant == "prompting":  # prompt tuning: only the prompt vectors train, each prompt starts with them
            assert t["trainable"] == ["soft_prompt.vectors"] and t["frozen"] > 0
            assert all(v == 4 for v, _ in t["prompts"]) and t["lr"] == pal.RunConfig.prompt_lr
            assert (run / "sft" / "final" / modeling.SOFT_PROMPT_DIR).is_dir()
        else:
            assert set(ALL_WEIGHTS) <= set(t["trainable"]) and t["frozen"] == 0
            assert all(v == 0 for v, _ in t["prompts"])

    # 2. pairs: the rejected replies come from the history-only prompt of the model the second stage starts from
    start = base if sw["tasks"] == "none" else sft_final
    pairs = inference(rec, "pairs")
    if sw["align"] == "dpo":
        rows = pal.read_jsonl(run / "pairs.jsonl")
        assert len(pairs) == len(rows) == 4
        for row, p in zip(rows, pairs):  # the history, none of the persona sentences
            assert row["history"][-1] in p["text"] and not any(per in p["text"] for per in row["personas"])
            assert row["rejected"] == "hello there , friend ." and row["chosen"] != row["rejected"]
    else:
        assert pairs == [] and not (run / "pairs.jsonl").exists()

    # 3. the second stage: DPO (reference = its start), SFT on gold (w/o PC), or none
    if sw["align"] == "none":
        assert second == []
    else:
        (t,) = second
        assert (start, True) in rec.loads
        assert t["mode"] == ("dpo" if sw["align"] == "dpo" else "sft")
        assert set(ALL_WEIGHTS) <= set(t["trainable"])
        prompts = [p for _, p in t["prompts"]]
        if sw["tasks"] == "gen":  # the prompt a list-generation row was trained on: nothing highlighted
            assert all(REPLY in p and HIGHLIGHT not in p for p in prompts)
        else:  # PAL's persona-enhanced prompt, the gold persona highlighted
            assert all(HIGHLIGHT in p for p in prompts)
        if sw["align"] == "dpo":
            assert t["ref"] is not None and (start, False) in rec.loads  # a frozen copy of the start is the reference

    # 4. inference: which weights, which prompts
    final = base if sw["tasks"] == "none" and sw["align"] == "none" else sft_final if sw["align"] == "none" \
        else dpo_final
    assert rec.loads[-1] == (final, False), rec.loads
    rows = pal.read_jsonl(run / "generations.jsonl")
    selects, replies = inference(rec, "select"), inference(rec, "reply")
    assert len(rows) == len(replies) == (FEW_SHOT_LIMIT if variant == "few_shot" else 4)
    if sw["strategy"] == "select":  # the model's own pick ("1") is highlighted, whatever the gold label
        assert len(selects) == 4
        assert all(f"{HIGHLIGHT} {r['personas'][0]}" in p["text"] for r, p in zip(rows, replies))
        assert all(r["selected_persona"] == r["personas"][0] for r in rows)
    elif sw["strategy"] == "random":
        assert selects == [] and all(r["selected_persona"] in r["personas"] for r in rows)
        assert all(f"{HIGHLIGHT} {r['selected_persona']}" in p["text"] for r, p in zip(rows, replies))
    else:
        assert selects == [] and all(HIGHLIGHT not in p["text"] and data.NO_PERSONA["en"] not in p["text"]
                                     for p in replies)
    if sw["fmt"] == "plain":
        assert all(REPLY not in p["text"] for p in replies)
    shots = pal.VARIANTS[variant].get("shots", 0)
    assert all(p["text"].count(REPLY) == 1 + shots for p in replies if sw["fmt"] != "plain")
    if shots:  # two Train dialogues, one turn each: its personas, its last two utterances and its gold reply
        assert shots == 2  # the paper: two demonstration dialogues
        train = pal.load_data(data_dir, limit=FEW_SHOT_LIMIT)[0]["train"]
        for p in replies:
            shown = p["text"][:p["text"].rindex("About you:")]  # what comes before the example's own prompt
            demos = [e for e in train if e.response in shown]
            assert len(demos) == 2 and len({e.dialogue_id for e in demos}) == 2
            for e in demos:
                assert all(per in shown for per in e.personas) and all(u in shown for u in e.history[-2:])
                assert len(e.history) < 3 or e.history[-3] not in shown
        assert len({p["text"][:p["text"].rindex("About you:")] for p in replies}) == 1  # the same for every prompt
    virtual = 4 if variant == "prompting" else 0
    assert all(p["virtual"] == virtual and len(p["soft"]) == virtual for p in rec.prompts)
    assert json.loads((run / "results.json").read_text())["variant"] == variant


@pytest.mark.parametrize("extra,expect", [
    (["--variant", "prompting", "--align", "dpo"], "--tune prompt: prompt tuning trains a soft prompt in the SFT"),
    (["--variant", "few_shot", "--shots", "3", "--limit", "40"], "--shots 3: the demonstrations take"),  # > 256
    (["--variant", "few_shot", "--max-len", "1024"], "--shots 2: there are only 1 Train dialogues"),
])
def test_rows_that_cannot_run_as_asked_are_one_line(tmp_path, tiny_model_dir, data_dir, extra, expect):
    with pytest.raises(SystemExit) as e:
        pal.main(["all", *_args(tmp_path / "r", tiny_model_dir, data_dir, *extra)])
    assert expect in str(e.value.code), e.value.code


def test_table_prints_the_rows_in_the_papers_order(tmp_path, tiny_model_dir, data_dir, monkeypatch, capsys):
    """Table 2's rows per model (base, +FineTuning, PAL), Table 5's (PAL, w/o PA, w/o PC), Figure 3 (PAL, Not
    Select) on its own, each titled with its metric convention."""
    runs = {}
    for variant in ("not_select", "pal", "zero_shot", "wo_pc", "wo_pa", "ft"):
        runs[variant], _ = run_row(tmp_path, tiny_model_dir, data_dir, monkeypatch, variant)
    capsys.readouterr()
    pal.main(["table", *map(str, runs.values())])
    out = capsys.readouterr().out
    print(out)
    main, rest = out.split("Table 5 (ablations")
    ablations, figure = rest.split("Figure 3 (strategies")
    assert main.startswith("Table 2 (PERSONA-CHAT") and "metrics: the project's default convention" in main
    order = lambda text, names: [text.index(f"| {n} |") for n in names]  # noqa: E731
    assert order(main, ["(base model)", "+FineTuning", "PAL"]) == sorted(order(main, ["(base model)", "+FineTuning",
                                                                                      "PAL"]))
    assert "w/o" not in main and "Not Select" not in main and "Not Select" not in ablations
    assert order(ablations, ["PAL", "w/o PA", "w/o PC"]) == sorted(order(ablations, ["PAL", "w/o PA", "w/o PC"]))
    assert order(figure, ["PAL", "Not Select"]) == sorted(order(figure, ["PAL", "Not Select"]))
    assert "w/o" not in figure.split("| Diagnostics")[0]


def test_a_run_recorded_before_the_tune_and_shots_switches_still_resumes(
        tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """stages.json written by an earlier version has no "tune" / "shots": they meant weights / 0, so the run goes
    on; asking that run for prompt tuning is a changed setting and is refused."""
    run, _ = run_row(tmp_path, tiny_model_dir, data_dir, monkeypatch, "wo_pa")
    records = json.loads((run / "stages.json").read_text())
    popped = [(k, rec["options"].pop(k)) for rec in records.values() for k in ("tune", "shots") if k in rec["options"]]
    assert {k for k, _ in popped} == {"tune", "shots"} and {v for _, v in popped} == {"weights", 0}
    (run / "stages.json").write_text(json.dumps(records))
    pal.main(["all", "--run-dir", str(run)])  # nothing to do, nothing refused
    with pytest.raises(SystemExit) as e:
        pal.main(["all", "--run-dir", str(run), "--tune", "prompt", "--align", "none"])
    assert "stage sft (finished) was built with other settings (--tune: 'weights' then, 'prompt' now" in \
        str(e.value.code)


@pytest.mark.parametrize("target", ["number", "sentence"])
def test_the_selection_target_is_a_number_or_the_authors_k_sentence(
        tmp_path, tiny_model_dir, data_dir, monkeypatch, target):
    """--select-target: the selection task answers "2" ("0": none), or as the authors' persona_datasets.py does,
    "2.i like cats" ("No personal description."); its prompt asks for that form, and Select then Generate reads
    either back to the sentence."""
    run, rec = run_row(tmp_path, tiny_model_dir, data_dir, monkeypatch, "pal", "--select-target", target)
    (t,) = stage_of(rec, run, "sft")
    train = pal.load_data(data_dir, limit=4)[0]["train"]
    selections = [f for f in t["feats"] if f["task"] == "select"]
    targets = sorted(rec.tok.decode([i for i in f["labels"] if i != -100], skip_special=True).strip()
                     for f in selections)  # the target without its end-of-text token
    gold = [e.personas[e.persona_label] if e.persona_label is not None else None for e in train]
    if target == "number":
        want = [str(e.persona_label + 1) if e.persona_label is not None else "0" for e in train]
    else:
        want = [f"{e.persona_label + 1}.{g}" if g else "No personal description." for e, g in zip(train, gold)]
    assert targets == sorted(want)
    asked = "Answer with its number" if target == "number" else 'or "No personal description." if none'
    assert all(asked in p for _, p in t["prompts"] if SELECT in p)
    assert all(asked in p["text"] for p in inference(rec, "select"))
