"""pal.py's run directory under hostile but fair use (issue 13): one writer at a time, a stage never mixes two
settings, options are checked before anything is saved, user errors are one line, a resumed random-persona
predict keeps its picks, and the exported checkpoints load in transformers and answer as `pal.py chat` does."""
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, _args, collate_sft, sft_features, shared_file, tiny_gpt2

import data
import dpo
import model as modeling
import pal
from infra import rundir


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random GPT-2 in Hugging Face layout with GPT-2's real BPE files under their hub names (vocab.json,
    merges.txt), so that transformers' AutoTokenizer can read the directory too."""
    tok_dir = shared_file("tokenizers/gpt2/encoder.json").parent
    d = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    modeling.save_model(modeling.build_model(modeling.GPT2Config(vocab_size=50257, n_positions=512, n_embd=32,
                                                                 n_layer=2, n_head=2)), d)
    os.symlink(tok_dir / "encoder.json", d / "vocab.json")
    os.symlink(tok_dir / "vocab.bpe", d / "merges.txt")
    return d


def _refused(capsys, argv, *expected):
    """pal.main(argv) exits non-zero with one line on stderr that contains every `expected` string."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        pal.main(argv)
    msg = str(e.value.code)
    assert e.value.code not in (0, None) and all(x in msg for x in expected), msg
    return msg


# ---- one run directory, one writer ----------------------------------------------------------------------------

def test_a_second_process_on_the_run_directory_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, pal; from pathlib import Path; "
                               f"from infra.rundir import RunLock; lock = RunLock(Path({str(run)!r})); "
                               "print('locked', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = _refused(capsys, ["pairs", "--run-dir", str(run), "--model", "gpt2"], "in use by pid", str(holder.pid))
        assert "another --run-dir" in msg
        assert not (run / "pairs.jsonl.partial").exists() and not (run / "run.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rundir.RunLock(run).release()  # the kernel dropped the dead holder's lock: nothing stale to clean up


# ---- a run is what it says it is --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".lock", "generations.jsonl.partial", "sft/phase0-mix/log.jsonl"])
def test_a_link_planted_in_the_run_directory_is_refused_and_its_target_untouched(tmp_path, name):
    """issue 23: `ln -s ~/notes.txt RUN/.lock` made the lock truncate notes.txt and write a pid into it."""
    from infra.files import JsonlWriter, append_jsonl
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    link = tmp_path / "run" / name
    link.parent.mkdir(parents=True)
    link.symlink_to(notes)
    open_it = {".lock": lambda: rundir.RunLock(tmp_path / "run"),
               "generations.jsonl.partial": lambda: JsonlWriter(tmp_path / "run" / "generations.jsonl"),
               "sft/phase0-mix/log.jsonl": lambda: append_jsonl(link, {"step": 1})}[name]
    with pytest.raises(ValueError, match=re.escape(f"{link} is a symbolic link: refused")):
        open_it()
    assert notes.read_text() == "my notes\n"


def test_changed_options_for_a_started_stage_are_refused_then_redone_on_request(tmp_path, tiny_model_dir,
                                                                                data_dir, capsys):
    run = tmp_path / "run"
    pal.main(["sft", *_args(run, tiny_model_dir, data_dir)])
    saved = (run / "run.json").read_bytes()
    # another base model after SFT: refused, naming the option and the stage; run.json unchanged
    other = tmp_path / "other-model"
    modeling.save_model(modeling.load_model(tiny_model_dir), other)
    for f in ("vocab.json", "merges.txt"):
        os.symlink(tiny_model_dir / f, other / f)
    _refused(capsys, ["predict", "--run-dir", str(run), "--model", str(other)], "stage sft (finished)", "--model")
    assert (run / "run.json").read_bytes() == saved
    # a half-done SFT resumed with another learning rate: refused too
    os.replace(run / "sft" / "final", tmp_path / "final-aside")
    _refused(capsys, ["sft", "--run-dir", str(run), "--sft-lr", "0.1"], "stage sft (started)", "--sft-lr")
    os.replace(tmp_path / "final-aside", run / "sft" / "final")
    # --redo: the old SFT moves to superseded/ (nothing is deleted) and SFT runs again with the new options
    pal.main(["sft", "--run-dir", str(run), "--sft-lr", "0.1", "--redo"])
    (old,) = (run / "superseded").iterdir()
    assert (old / "sft" / "final" / "model.safetensors").exists() and (run / "sft" / "final").exists()
    assert json.loads((run / "stages.json").read_text())["sft"]["options"]["sft_lr"] == 0.1


def test_a_resumed_predict_with_another_data_directory_is_refused(tmp_path, tiny_model_dir, data_dir, capsys):
    run = tmp_path / "run"
    args = _args(run, tiny_model_dir, data_dir, "--variant", "zero_shot")
    pal.main(["predict", *args])
    (run / "generations.jsonl").rename(run / "generations.jsonl.partial")  # as if killed before the end
    _refused(capsys, ["predict", "--run-dir", str(run), "--data-dir", str(ROOT / "samples")],
             "stage predict (started)", "--data-dir")


def test_a_data_file_changed_under_a_run_is_caught(tmp_path, tiny_model_dir, capsys):
    src = shared_file("data/personachat/valid_self_original.txt")
    d = tmp_path / "data"
    d.mkdir()
    (d / src.name).write_bytes(src.read_bytes())
    run = tmp_path / "run"
    pal.main(["predict", *_args(run, tiny_model_dir, d, "--variant", "zero_shot")])
    with open(d / src.name, "a") as f:
        f.write("1 your persona: i was added later .\n2 hi\thello\n")
    _refused(capsys, ["evaluate", "--run-dir", str(run)], "stage predict (finished)", f"file {d / src.name}")


def test_a_data_file_edited_during_a_run_is_refused_by_the_next_stage_that_parses_it(tmp_path, tiny_model_dir,
                                                                                     monkeypatch, capsys):
    """issue 23: the digests were taken once at the start, so SFT trained on one file and pairs on its edit."""
    src = shared_file("data/personachat/valid_self_original.txt")
    d = tmp_path / "data"
    d.mkdir()
    (d / src.name).write_bytes(src.read_bytes())
    sft = pal.STAGES["sft"]

    def sft_then_edit(cfg, run):
        """SFT, then the data file is edited."""
        sft(cfg, run)
        with open(d / src.name, "a") as f:  # as if edited by hand at SFT step 20
            f.write("1 your persona: i was added later .\n2 hi\thello\n")

    monkeypatch.setitem(pal.STAGES, "sft", sft_then_edit)
    run = tmp_path / "run"
    _refused(capsys, ["all", *_args(run, tiny_model_dir, d)], f"{d / src.name} changed during this run")
    assert (run / "sft" / "final").exists() and not (run / "pairs.jsonl").exists()


def test_the_language_is_decided_by_share_said_and_kept_in_run_json(tmp_path, tiny_model_dir, capsys):
    """issue 23: one CJK word among the first 20 examples switched a whole English run to Chinese."""
    src = shared_file("data/personachat/valid_self_original.txt")
    d = tmp_path / "data"
    d.mkdir()
    lines = src.read_text().split("\n")
    for i in (4, 5):  # the first two replies of the first dialogue (both in the run's 16 examples) name a dish
        lines[i] = lines[i].replace("\t", "\t饺子 ", 1)
    (d / src.name).write_text("\n".join(lines))
    capsys.readouterr()
    pal.main(["sft", *_args(tmp_path / "en", tiny_model_dir, d, "--variant", "zero_shot")])
    assert "language: en (12% of 16 examples hold CJK characters; --lang overrides)" in capsys.readouterr().err
    assert json.loads((tmp_path / "en" / "run.json").read_text())["lang"] == "en"
    pal.main(["sft", *_args(tmp_path / "zh", tiny_model_dir, d, "--variant", "zero_shot", "--lang", "zh")])
    assert json.loads((tmp_path / "zh" / "run.json").read_text())["lang"] == "zh"


def test_base_weights_replaced_in_place_are_caught_by_their_digest(tmp_path, tiny_model_dir, data_dir, capsys):
    """issue 23: only config.json was hashed, so new weights under the same config regenerated every pair."""
    import shutil
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base, symlinks=True)
    run = tmp_path / "run"
    pal.main(["sft", *_args(run, base, data_dir)])
    m = modeling.load_model(base)
    with torch.no_grad():
        m.wte.weight.mul_(2)
    modeling.save_model(m, base)
    _refused(capsys, ["pairs", "--run-dir", str(run)], "stage sft (finished) was built with other settings",
             "weights digest")


def test_the_nli_labeller_and_the_global_batch_are_recorded(tmp_path, monkeypatch):
    """issue 23: with --labels nli a later --nli B was taken (SFT on A's labels, pairs on B's); a run of two ranks
    resumed by one process silently doubled its steps."""
    nli_dirs = []
    for name in ("A", "B"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(name.encode() * 64)  # hashed, never parsed here
        nli_dirs.append(str(d))

    def now(cfg):
        return {s: {**pal.stage_options(cfg, s), **pal.input_digests(cfg)} for s in pal.STAGES}

    a = pal.RunConfig(model="gpt2", labels="nli", nli=nli_dirs[0])
    records = {"sft": {"options": now(a)["sft"]}}
    done = {s: False for s in pal.STAGES}
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "log.jsonl").write_text("")  # SFT has begun writing
    with pytest.raises(ValueError, match=r"stage sft \(started\).*nli \(labels\)"):
        b = pal.RunConfig(model="gpt2", labels="nli", nli=nli_dirs[1])
        rundir.check_records(tmp_path, dict(records), now(b), done, pal.STAGE_PATHS, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    records = {"sft": {"options": now(a)["sft"]}}
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match=r"global batch \(sft\): 16 then, 8 now"):
        rundir.check_records(tmp_path, dict(records), now(a), done, pal.STAGE_PATHS, False, pal.RESUME_ONLY,
                             pal.ADDED_LATER)
    rundir.check_records(tmp_path, dict(records), now(a), {**done, "sft": True}, pal.STAGE_PATHS, False,
                         pal.RESUME_ONLY, pal.ADDED_LATER)  # a finished SFT does not care


def test_a_run_directory_with_outputs_but_no_records_is_refused_unless_trusted(tmp_path, tiny_model_dir, data_dir,
                                                                               capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pairs.jsonl").write_text("")
    _refused(capsys, ["sft", *_args(run, tiny_model_dir, data_dir, "--variant", "zero_shot")],
             f"{run} holds outputs (pairs.jsonl) but no stages.json", "--trust-outputs")
    pal.main(["sft", *_args(run, tiny_model_dir, data_dir, "--variant", "zero_shot", "--trust-outputs")])


def test_predict_counts_the_prompts_it_cuts(tmp_path, tiny_model_dir, data_dir, capsys):
    """issue 23: predict cut prompts to their last tokens (instruction and personas gone) without a count."""
    capsys.readouterr()
    pal.main(["predict", *_args(tmp_path / "run", tiny_model_dir, data_dir, "--variant", "zero_shot", "--max-len",
                                "40")])
    said = re.search(r"predict: prompts (\d+) encoded, .*\((\d+) left out, (\d+) prompts cut\)",
                     capsys.readouterr().err)
    assert said and said[1] == said[3] == "4", said  # 4 Test examples, not one fits 35 tokens


def test_an_empty_valid2_is_refused_and_empty_rejected_replies_are_counted(tmp_path, tiny_model_dir, data_dir,
                                                                           monkeypatch, capsys):
    """issue 23: an empty Valid#2 ran DPO without validation, silently; empty rejected replies were not counted."""
    load_data = pal.load_data
    monkeypatch.setattr(pal, "load_data", lambda *a: ({**load_data(*a)[0], "valid2": []}, "en"))
    run = tmp_path / "run"
    _refused(capsys, ["all", *_args(run, tiny_model_dir, data_dir)], "no Valid#2 examples in", "--eval-limit 0")
    assert not (run / "sft").exists()  # said before SFT trains, not after
    monkeypatch.undo()
    pal.main(["sft", *_args(run, tiny_model_dir, data_dir)])
    pal.main(["pairs", "--run-dir", str(run)])
    rows = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
    (run / "pairs.jsonl").write_text("".join(json.dumps({**r, "rejected": "" if i == 0 else r["rejected"]}) + "\n"
                                             for i, r in enumerate(rows)))
    capsys.readouterr()
    pal.main(["dpo", "--run-dir", str(run)])
    assert f"(1 of {len(rows)} with an empty rejected reply)" in capsys.readouterr().err


def test_from_run_naming_the_run_itself_is_refused(tmp_path, tiny_model_dir, data_dir, capsys):
    """issue 23: it recursed until Python's limit."""
    run = tmp_path / "run"
    _refused(capsys, ["predict", *_args(run, tiny_model_dir, data_dir, "--variant", "random", "--from-run", str(run))],
             f"--from-run {run}: that is this run")


def test_a_stage_that_failed_while_loading_starts_again_once_its_input_is_fixed(tmp_path, tiny_model_dir, capsys):
    """issue 23: the stage was recorded before it read its data, so the fixed file needed --redo."""
    src = shared_file("data/personachat/valid_self_original.txt").read_text().split("\n")[:300]
    d = tmp_path / "data"
    d.mkdir()
    (d / "valid_self_original.txt").write_text("\n".join(["oops"] + src) + "\n")
    run = tmp_path / "run"
    args = _args(run, tiny_model_dir, d, "--variant", "zero_shot", "--lang", "en")  # no data read before the stage
    _refused(capsys, ["predict", *args], f"{d / 'valid_self_original.txt'}:1: expected a line starting with its number")
    (d / "valid_self_original.txt").write_text("\n".join(src) + "\n")
    pal.main(["predict", *args])
    assert "predict: started before with other settings but wrote nothing" in capsys.readouterr().err
    assert (run / "generations.jsonl").exists()


def test_chat_takes_other_decoding_options(tmp_path, tiny_model_dir, data_dir, monkeypatch, capsys):
    """issue 23: chat was refused for --max-new-tokens other than predict's (a stage record it does not write)."""
    run = tmp_path / "run"
    pal.main(["predict", *_args(run, tiny_model_dir, data_dir, "--variant", "zero_shot")])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n"))
    capsys.readouterr()
    pal.main(["chat", "--run-dir", str(run), "--max-new-tokens", "7", "--persona", "i like cats ."])
    assert "bot> " in capsys.readouterr().out


# ---- options are checked before anything is saved ------------------------------------------------------------------

@pytest.mark.parametrize("option,value,expect", [
    ("--limit", "-1", "--limit -1: must be at least 1"), ("--limit", "0", "--limit 0: must be at least 1"),
    ("--max-new-tokens", "0", "--max-new-tokens 0: must be at least 1"),
    ("--max-new-tokens", "256", "--max-new-tokens 256: must be below --max-len 256"),
    ("--sft-epochs", "0", "--sft-epochs 0.0: must be above 0"),
    ("--select-ratio", "1.5", "--select-ratio 1.5: must be between 0 and 1"),
    ("--max-len", "4096", "--max-len 4096: the model"),  # the tiny GPT-2 has 512 positions
    ("--sft-lr", "inf", "--sft-lr inf: must be a finite number"),  # issue 23: NaN passed every `<` check
    ("--dpo-beta", "nan", "--dpo-beta nan: must be a finite number"),
    ("--lora-alpha", "inf", "--lora-alpha inf: must be a finite number"),
])
def test_a_bad_option_leaves_run_json_unchanged(tmp_path, tiny_model_dir, data_dir, capsys, option, value, expect):
    run = tmp_path / "run"
    pal.main(["sft", *_args(run, tiny_model_dir, data_dir, "--variant", "zero_shot")])  # no SFT: run.json only
    saved = (run / "run.json").read_bytes()
    _refused(capsys, ["sft", "--run-dir", str(run), option, value], expect)
    assert (run / "run.json").read_bytes() == saved


def test_a_diverging_run_stops_with_the_step_and_writes_no_result(tmp_path, tiny_model_dir, data_dir, capsys):
    """--sft-lr 1e6 diverges: SFT stops naming its step, nothing is exported, no later stage runs (issue 23)."""
    run = tmp_path / "run"
    _refused(capsys, ["all", *_args(run, tiny_model_dir, data_dir, "--sft-lr", "1e6")],
             "sft: the loss or gradient norm is not finite (NaN or inf) at step", str(run / "sft"))
    assert not (run / "sft" / "final").exists() and not (run / "results.md").exists()


def test_json_files_are_never_written_with_nan_or_infinity(tmp_path):
    from infra.files import write_json
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'run.json'}: not written: a value is not a finite")):
        write_json(tmp_path / "run.json", {"sft_lr": float("inf")})
    assert not (tmp_path / "run.json").exists()


def test_a_bad_choice_is_refused_by_the_command_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        pal.main(["sft", "--run-dir", str(tmp_path / "r"), "--dtype", "fp8"])
    assert e.value.code == 2 and not (tmp_path / "r").exists()


def test_zero_rows_are_an_error_not_a_table_of_zeros(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model": "gpt2"}))
    (run / "generations.jsonl").write_text("")
    _refused(capsys, ["evaluate", "--run-dir", str(run), "--trust-outputs"], "no generated rows", "generations.jsonl")
    assert not (run / "results.json").exists()


# ---- user errors: one line, no traceback; no run directory made by mistake ----------------------------------------

@pytest.mark.parametrize("stage", ["evaluate", "chat"])
def test_a_mistyped_run_directory_is_one_line_and_not_created(tmp_path, stage):
    run = tmp_path / "typo"
    p = subprocess.run([sys.executable, "pal.py", stage, "--run-dir", str(run)], cwd=ROOT, capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "Traceback" not in p.stderr and not run.exists()
    assert p.stderr.strip().count("\n") == 0 and f"{run / 'run.json'} does not exist" in p.stderr
    p = subprocess.run([sys.executable, "pal.py", stage, "--run-dir", str(run), "--debug"], cwd=ROOT,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "Traceback" in p.stderr and "FileNotFoundError" in p.stderr


# ---- resume: random persona picks ----------------------------------------------------------------------------------

def test_random_strategy_resumes_with_the_same_picks(tmp_path, data_dir, monkeypatch):
    """Killed after two rows, a random-persona predict goes on with the picks the whole run would have made."""
    splits, lang = pal.load_data(data_dir, limit=6)
    examples = splits["test"]
    monkeypatch.setattr(pal, "generate_texts", lambda model, tok, ids, n, batch, desc="", on_batch=None: (
        on_batch(range(len(ids)), ["ok"] * len(ids)) if on_batch else None, ["ok"] * len(ids))[1])
    monkeypatch.setattr(data, "encode_generation_prompt", lambda *a, **kw: ([0], 0))
    kw = dict(strategy="random", seed=3)
    whole = pal.select_then_generate(None, None, examples, lang, **kw)
    w = pal.JsonlWriter(tmp_path / "g.jsonl")
    for row in whole[:2]:
        w.write(row)
    w.f.close()
    resumed = pal.select_then_generate(None, None, examples, lang, writer=pal.JsonlWriter(tmp_path / "g.jsonl"), **kw)
    assert [r["selected_persona"] for r in resumed] == [r["selected_persona"] for r in whole]
    assert len({r["selected_persona"] for r in whole}) > 1


# ---- exported checkpoints are complete for the ecosystem -----------------------------------------------------------

def test_exported_checkpoints_load_in_transformers_and_reply_as_chat(tmp_path, tiny_model_dir, data_dir, capsys):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    for stage in ("sft", "dpo"):  # wo_pc: DPO's place is an SFT on Valid#1's gold responses, with validation
        pal.main([stage, *_args(run, tiny_model_dir, data_dir, "--variant", "wo_pc")])
    cfg = pal.load_run_config(run, {})
    personas, said = ["i love dogs .", "i work at a bank ."], "hello , how are you ?"
    capsys.readouterr()
    pal.stage_chat(cfg, run, personas, stream=io.StringIO(said + "\n\n"))
    reply = capsys.readouterr().out.split("bot> ")[1].split("\n")[0]
    ours = data.load_tokenizer(tiny_model_dir)
    for stage in ("sft", "dpo"):
        final = run / stage / "final"
        tok = transformers.AutoTokenizer.from_pretrained(final)
        hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
        gen = json.loads((final / "generation_config.json").read_text())
        assert gen["do_sample"] is False and gen["max_new_tokens"] == 5 and gen["eos_token_id"] == list(ours.stop_ids)
        if stage != "dpo":
            continue  # wo_pc: chat answers with the aligned model; select, then generate, as pal.py does
        ex = data.Example(personas=personas, history=[said], response="", persona_label=None, dialogue_id=-1)

        def hf_reply(ids):
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            return tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()

        pick = hf_reply(data.encode_generation_prompt(ours, ex, "select", "en", max_len=251)[0])
        chosen = data.parse_selection(pick, personas, "en")
        ids = data.encode_generation_prompt(ours, ex, "generate", "en", persona=chosen, max_len=251)[0]
        assert tok(tok.decode(ids))["input_ids"] == ids  # the exported tokenizer is GPT-2's
        assert hf_reply(ids) == reply


# ---- data and checkpoint problems reach the pipeline's output ---------------------------------------------------

def test_the_pipeline_reports_data_problems_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    src = shared_file("data/personachat/valid_self_original.txt").read_bytes().split(b"\n")
    d = tmp_path / "data"
    d.mkdir()
    bad = [b"1 hello there \xff friend\tthanks !", b"2 how are you ?"]  # a non-UTF-8 byte; a turn without a tab
    (d / "valid_self_original.txt").write_bytes(b"\n".join(bad + src[:400]) + b"\n")
    pal.main(["predict", *_args(tmp_path / "run", tiny_model_dir, d, "--variant", "zero_shot")])
    err = capsys.readouterr().err
    f = d / "valid_self_original.txt"
    assert f"{f}:1: invalid UTF-8" in err and f"{f}:2: turn without a response" in err
    assert f"{f}:1: dialogue without persona lines" in err and "no_persona_dialogues=1" in err


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, tiny_model_dir, data_dir, capsys):
    small = tmp_path / "small-vocab"
    modeling.save_model(modeling.build_model(modeling.GPT2Config(vocab_size=1000, n_positions=512, n_embd=32,
                                                                 n_layer=1, n_head=2)), small)
    for f in ("vocab.json", "merges.txt"):
        os.symlink(tiny_model_dir / f, small / f)
    _refused(capsys, ["predict", *_args(tmp_path / "run", small, data_dir, "--variant", "zero_shot")],
             "50257 ids", "1000 rows")


# ---- torchrun ------------------------------------------------------------------------------------------------------

def test_torchrun_two_ranks_run_the_whole_pipeline_in_step(tmp_path, tiny_model_dir, data_dir):
    """`torchrun --nproc_per_node 2 pal.py all` on CPU (gloo): rank 1 waits for the pairs rank 0 writes before
    DPO, every file is written once (run.json, pairs, generations), and each training step is logged once."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "pal.py", "all", *_args(run, tiny_model_dir, data_dir, "--batch-size", "1")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(pal.read_jsonl(run / "pairs.jsonl")) == 4 and len(pal.read_jsonl(run / "generations.jsonl")) == 4
    assert json.loads((run / "results.json").read_text())["n"] == 4
    for stage in ("sft/phase0-mix", "dpo"):
        steps = [r["step"] for r in pal.read_jsonl(run / stage / "log.jsonl") if "eval" not in r]
        assert steps == sorted(set(steps)) and steps, (stage, steps)
    assert set(json.loads((run / "stages.json").read_text())) == {"sft", "pairs", "dpo", "predict", "evaluate"}
    assert p.stderr.count("[pal] sft: done") == 1  # one voice: rank 0's


def test_evaluation_intervals_and_dpo_epochs_count_examples_over_all_ranks(monkeypatch):
    cfg = pal.RunConfig(batch_size=4, grad_accum=2, eval_every=64, dpo_epochs=1.0)
    one = pal.train_config(cfg, "dpo", Path("x"), n_features=256)
    monkeypatch.setenv("WORLD_SIZE", "4")
    four = pal.train_config(cfg, "dpo", Path("x"), n_features=256)
    assert (one.max_steps, one.eval_every) == (32, 8)  # 256 pairs / 8 per step; every 64 examples = 8 steps
    assert (four.max_steps, four.eval_every) == (8, 2)  # 32 pairs per step over 4 ranks: the same examples seen


def test_fp16_weights_with_fp16_loss_scaling_are_refused_before_saving(tmp_path, capsys):
    _refused(capsys, ["sft", "--run-dir", str(tmp_path / "r"), "--model", "gpt2", "--dtype", "fp16", "--precision",
                      "fp16"], "--precision fp16 with --dtype fp16")
    assert not (tmp_path / "r").exists()


def test_predict_generates_with_exactly_the_validated_lora_model(tmp_path):
    """A bf16 base with LoRA: merging rounds W + BA to bf16 once, which drops a small delta; predict rebuilds the
    model that was validated (base + fp32 adapters, unmerged) and gets its logits bit for bit."""
    import dpo
    base = tmp_path / "base"
    torch.manual_seed(0)
    modeling.save_model(modeling.build_model(modeling.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)), base)
    cfg = pal.RunConfig(model=str(base), dtype="bf16", lora_r=4, lora_alpha=8)
    m = pal.trainable_model(cfg, str(base))
    with torch.no_grad():  # a small trained delta, as DPO at lr ~1e-6 leaves
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=1e-3)
    out = tmp_path / "final"
    dpo.export_model(m, out, add_files=lambda d: pal.note_adapter_base(d, base, cfg))
    ids = torch.tensor([list(range(3, 30))])
    with torch.no_grad():
        validated = m.eval()(ids)
        assert torch.equal(pal.generation_model(cfg, out)(ids), validated)
        assert not torch.equal(modeling.load_model(out, dtype=torch.bfloat16)(ids), validated)


# ---- the data the paper used ---------------------------------------------------------------------------------------

def test_revised_personas_and_history_turns_reach_the_pipeline(tmp_path, tiny_model_dir, capsys):
    lines = shared_file("data/personachat/valid_self_original.txt").read_text().split("\n")[:300]
    d = tmp_path / "data"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"{split}_self_original.txt").write_text("\n".join(lines) + "\n")
        revised = [x.replace("your persona: ", "your persona: revised ") for x in lines]
        (d / f"{split}_self_revised.txt").write_text("\n".join(revised) + "\n")
    splits, _ = pal.load_data(str(d), limit=8, personas="revised", history_turns=2)
    assert all(p.startswith("revised ") for e in splits["train"] + splits["valid1"] for p in e.personas)
    assert not any(p.startswith("revised ") for e in splits["test"] for p in e.personas)  # Test stays original
    assert max(len(e.history) for k in splits for e in splits[k]) == 2
    run = tmp_path / "run"  # the options land in run.json and in what the stages record
    pal.main(["predict", *_args(run, tiny_model_dir, d, "--variant", "zero_shot", "--personas", "revised",
                                "--history-turns", "2")])
    rows = pal.read_jsonl(run / "generations.jsonl")
    assert all(len(r["history"]) <= 2 for r in rows) and not rows[0]["personas"][0].startswith("revised ")
    recorded = json.loads((run / "stages.json").read_text())["predict"]["options"]
    assert recorded["personas"] == "revised" and recorded["history_turns"] == 2
    assert any(k.endswith("train_self_revised.txt") for k in recorded)


# ---- schedules (issue 11): stage-specific LoRA and accumulation, SFT keeps its last epoch ----------------------------

def _tiny_llama_dir(d):
    torch.manual_seed(0)
    modeling.save_model(modeling.build_model(modeling.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)), d)
    return d


def test_a_moved_lora_run_uses_its_own_sft_and_replaced_base_weights_are_refused(tmp_path, tiny_model_dir,
                                                                                 data_dir, capsys):
    """issue 23: adapter_base.json held an absolute path, so a moved run predicted with whatever sat at the old
    place; base weights replaced in place went unnoticed; {"base": 3} was looked up as a hub repo."""
    from infra import exports
    run, moved = tmp_path / "run", tmp_path / "moved"
    # fresh DPO adapters on the merged SFT weights: the adapters' base lies inside the run
    pal.main(["all", *_args(run, tiny_model_dir, data_dir, "--lora-r", "2", "--dpo-adapters", "fresh")])
    os.replace(run, moved)
    assert exports.read_adapter_base(moved / "dpo" / "final")["base"] == str(moved.resolve() / "sft" / "final")
    (moved / "generations.jsonl").unlink()
    pal.main(["predict", "--run-dir", str(moved)])  # works where it now lies
    sft = modeling.load_model(moved / "sft" / "final")
    with torch.no_grad():
        sft.wte.weight.mul_(1.5)
    modeling.save_model(sft, moved / "sft" / "final")  # same config.json, other weights
    (moved / "generations.jsonl").unlink()
    _refused(capsys, ["predict", "--run-dir", str(moved)], f"{moved / 'dpo' / 'final' / 'adapter_base.json'}: ",
             "holds other weights than the adapters were trained on")
    noted = moved / "dpo" / "final" / "adapter_base.json"
    noted.write_text(json.dumps({**json.loads(noted.read_text()), "base": 3}))
    _refused(capsys, ["predict", "--run-dir", str(moved)], f"{noted}: 'base' is 3")


def test_dpo_only_lora_on_the_chosen_layers_and_per_stage_accumulation(tmp_path):
    base = _tiny_llama_dir(tmp_path / "base")
    cfg = pal.RunConfig(model=str(base), lora_r=0, dpo_lora_r=4, lora_alpha=8, lora_targets="q,v", batch_size=2,
                        grad_accum=8, dpo_grad_accum=2, eval_every=64, dpo_epochs=1.0)
    assert not modeling.lora_layers(pal.trainable_model(cfg, str(base), "sft"))  # GPT-2 presets: full SFT
    wrapped = modeling.lora_layers(pal.trainable_model(cfg, str(base), "dpo"))
    assert wrapped and {name.rsplit(".", 1)[-1] for name in wrapped} == {"q", "v"}
    sft, dpo_cfg = pal.train_config(cfg, "sft", Path("x"), 64), pal.train_config(cfg, "dpo", Path("x"), 64)
    assert (sft.grad_accum, dpo_cfg.grad_accum, dpo_cfg.max_steps, dpo_cfg.eval_every) == (8, 2, 16, 16)
    assert sft.export_best is False
    assert pal.train_config(pal.RunConfig(sft_keep="best"), "sft", Path("x"), 8).export_best


def test_export_best_false_exports_the_last_weights_not_the_best_validated(tmp_path):
    runs = {}
    for keep_best in (True, False):
        m = tiny_gpt2(dropout=0.0)
        cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path / str(keep_best)), batch_size=2, max_steps=3, lr=1e-2,
                              warmup_steps=0, eval_every=1, export_best=keep_best, progress=False)
        scores = iter([3.0, 1.0, 0.0])  # the first evaluation is the best
        dpo.train(m, cfg, sft_features(6), collate_sft, eval_fn=lambda _: next(scores))
        runs[keep_best] = (modeling.load_model(tmp_path / str(keep_best) / "final").state_dict(), m.state_dict())
    best_export, _ = runs[True]
    last_export, last_weights = runs[False]
    k = next(iter(last_weights))
    assert torch.equal(last_export[k], last_weights[k]) and not torch.equal(best_export[k], last_export[k])


def test_an_inference_only_variant_reuses_a_trained_run(tmp_path, tiny_model_dir, data_dir):
    trained, random_run = tmp_path / "wo_pa", tmp_path / "random"
    pal.main(["all", *_args(trained, tiny_model_dir, data_dir, "--variant", "wo_pa")])
    pal.main(["all", *_args(random_run, tiny_model_dir, data_dir, "--variant", "random", "--from", str(trained))])
    assert not (random_run / "sft").exists() and not (random_run / "pairs.jsonl").exists()
    cfg = pal.load_run_config(random_run, {})
    assert pal.final_weights(cfg, random_run) == trained / "sft" / "final"
    rows = pal.read_jsonl(random_run / "generations.jsonl")
    assert rows and all(r["selection_output"] is None and r["selected_persona"] in r["personas"] for r in rows)


def test_wo_mix_has_no_persona_aware_learning(tmp_path, tiny_model_dir, data_dir):
    cfg = pal.RunConfig(model=str(tiny_model_dir), variant="wo_mix")
    assert not pal.stage_runs(cfg, "sft") and pal.stage_runs(cfg, "pairs") and pal.stage_runs(cfg, "dpo")
    assert pal.sft_weights(cfg, tmp_path) == str(tiny_model_dir)  # pairs and DPO from the base model
