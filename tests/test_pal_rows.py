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


def run_row(tmp_path, model_dir, data_dir, monkeypatch, variant, *extra):
    tok = data.load_tokenizer(str(model_dir))
    rec = Recorder(tok)
    monkeypatch.setattr(dpo, "train", rec.train)
    monkeypatch.setattr(modeling, "generate", rec.generate)
    monkeypatch.setattr(pal, "load_stage_model", rec.load(pal.load_stage_model))
    run = tmp_path / variant
    room = ["--max-len", "1024"] if variant == "few_shot" else []  # three demonstrations need room
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
def test_each_row_trains_freezes_loads_and_prompts_as_the_paper_defines_it(tmp_path, tiny_model_dir, data_dir,
                                                                          monkeypatch, variant):
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
        if sw["tasks"] == "dg":  # the prompt only DG was trained on: the persona list, nothing highlighted
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
    assert len(rows) == len(replies) == 4
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
    if shots:  # the demonstrations' gold replies are in the prompt, before the example's own
        train = pal.load_data(data_dir, limit=4)[0]["train"]
        assert sum(e.response in replies[0]["text"] for e in train) >= shots
    virtual = 4 if variant == "prompting" else 0
    assert all(p["virtual"] == virtual and len(p["soft"]) == virtual for p in rec.prompts)
    assert json.loads((run / "results.json").read_text())["variant"] == variant


@pytest.mark.parametrize("extra,expect", [
    (["--variant", "prompting", "--align", "dpo"], "--tune prompt: prompt tuning trains a soft prompt in the SFT"),
    (["--variant", "few_shot"], "--shots 3: the demonstrations take"),  # three of them do not fit 256 tokens
    (["--variant", "few_shot", "--shots", "5", "--max-len", "1024"], "--shots 5: there are only 4 Train examples"),
])
def test_rows_that_cannot_run_as_asked_are_one_line(tmp_path, tiny_model_dir, data_dir, extra, expect):
    with pytest.raises(SystemExit) as e:
        pal.main(["all", *_args(tmp_path / "r", tiny_model_dir, data_dir, *extra)])
    assert expect in str(e.value.code), e.value.code


def test_table_prints_the_rows_in_the_papers_order(tmp_path, tiny_model_dir, data_dir, monkeypatch, capsys):
    runs = {}
    for variant in ("not_select", "pal", "zero_shot", "wo_pa", "ft"):
        runs[variant], _ = run_row(tmp_path, tiny_model_dir, data_dir, monkeypatch, variant)
    capsys.readouterr()
    pal.main(["table", *map(str, runs.values())])
    out = capsys.readouterr().out
    main, ablations = out.split("Ablations (the paper's Table 5)")
    assert "Baselines and PAL (the paper's Table 2)" in main
    order = lambda text, names: [text.index(f"| {n} |") for n in names]  # noqa: E731
    assert order(main, ["Zero-shot", "+FT", "PAL"]) == sorted(order(main, ["Zero-shot", "+FT", "PAL"]))
    assert "w/o PA" not in main and "Not Select" not in main
    assert order(ablations, ["PAL", "w/o PA", "Not Select"]) == sorted(order(ablations, ["PAL", "w/o PA",
                                                                                          "Not Select"]))
    assert "| Model | Method | BLEU-1 | BLEU-2 | ROUGE-L | Entropy | C.score |" in out


def test_a_run_recorded_before_the_tune_and_shots_switches_still_resumes(tmp_path, tiny_model_dir, data_dir,
                                                                          monkeypatch):
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
