"""Bad input is reported, never a crash or a silent loss (issue 13, point 6): data problems name file:line, a
corrupt model file names the file (and the key). Every input is crafted in tmp_path; the real GPT-2 tokenizer
comes from ../shared."""
import json
import random
import re

import pytest
import torch
from conftest import shared_file

import data as pd
import model as M

PERSONA_DIALOGUE = "1 your persona: i like to ski.\n2 hi\thello , i ski .\n3 cool\tyes very cool .\n"


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def gpt2():
    return pd.load_tokenizer(shared_file("tokenizers/gpt2/encoder.json").parent)


# ---------------------------------------------------------------------------------------------- data files

@pytest.mark.parametrize("name,content", [("valid_self_original.txt", ""), ("valid_self_original.txt", "\n\n"),
                                          ("valid.jsonl", ""),
                                          ("valid_self_original.txt", "1 your persona: i ski.\n2 anyone ?\n")],
                         ids=["empty", "blank-lines", "empty-jsonl", "no-response"])
def test_file_without_dialogues_names_the_file(tmp_path, name, content):
    """Was: an empty list of dialogues, so an empty split, discovered (if at all) much later."""
    p = write(tmp_path / name, content)
    with pytest.raises(pd.DataFormatError, match=rf"{p.name}: no dialogues .*\(empty file\?\)"):
        pd.read_dialogues(p)
    with pytest.raises(pd.DataFormatError, match=rf"{p.name}: no dialogues"):
        pd.load_splits(tmp_path)


def test_dialogue_without_personas_is_kept_and_counted(tmp_path, gpt2):
    """Was: kept without any count. Such examples have an empty persona list; every prompt mode still encodes."""
    p = write(tmp_path / "n.txt", PERSONA_DIALOGUE + "1 hi there\thello .\n2 how are you ?\tfine .\n")
    d = pd.read_personachat(p)
    assert d.stats.no_persona_dialogues == 1 and d.stats.notes == [f"{p}:4: dialogue without persona lines"]
    ex = pd.make_examples(d)
    assert [e.personas for e in ex] == [["i like to ski."]] * 2 + [[]] * 2
    for mode in pd.MODES:
        feats, _ = pd.sft_features(gpt2, ex[2:], mode)
        assert len(feats) == 2
    assert pd.selection_target(ex[2]) == "0" and pd.parse_selection("1", ex[2].personas) is None
    rows = [[[], ["hi"], "hello ."], [["i ski."], ["hey"], "i ski ."]]
    p = write(tmp_path / "n.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    j = pd.read_baidu_jsonl(p)
    assert j.stats.no_persona_dialogues == 1 and j.stats.notes == [f"{p}:1: dialogue without persona lines"]


def test_replaced_bytes_and_missing_tab_are_noted_with_file_and_line(tmp_path):
    """Verification only: both were counted and noted with file:line before this issue (passes on the old code)."""
    p = write(tmp_path / "x.txt", b"1 your persona: i ski.\n2 caf\xe9 ?\tyes\n3 no tab here\n4 and\tback\n")
    d = pd.read_personachat(p)
    s = d.stats
    assert (s.invalid_utf8_lines, s.missing_responses, s.examples) == (1, 1, 2)
    assert s.notes == [f"{p}:2: invalid UTF-8 replaced by U+FFFD",
                       f"{p}:3: turn without a response (kept as history only)"]
    assert pd.make_examples(d)[1].history == ["caf\ufffd ?", "yes", "no tab here", "and"]


def test_parse_report_shows_counters_and_first_notes(tmp_path):
    """Was: no report (ParseStats.report is new)."""
    text = "".join(f"{n} turn {n}\n" for n in range(1, 6)) + "6 finally\tan answer\n"  # 5 turns without a tab
    s = pd.read_personachat(write(tmp_path / "r.txt", text)).stats
    report = s.report(first=2).split("\n")
    assert report[0] == "r.txt: 1 dialogues, 1 examples (no_persona_dialogues=1, missing_responses=5)"
    assert report[1:] == [f"    {tmp_path / 'r.txt'}:1: turn without a response (kept as history only)",
                          f"    {tmp_path / 'r.txt'}:2: turn without a response (kept as history only)",
                          "    ... 4 more noted (ParseStats.notes keeps the first 20)"]
    assert pd.read_personachat(write(tmp_path / "ok.txt", PERSONA_DIALOGUE)).stats.report() == \
        "ok.txt: 1 dialogues, 2 examples"


MEGA = 1_000_000


def test_megabyte_line_is_cut_at_parse_and_never_overflows_max_len(tmp_path, gpt2):
    """Was: the megabyte texts reached the tokenizer whole (a run of 1M spaces makes tiktoken panic, a
    BaseException that nothing catches), and every feature list returned features far beyond max_len."""
    huge_partner = "hi" + " " * MEGA + "there"            # what crashed tiktoken (PanicException)
    huge_response = "la " * (MEGA // 3)
    text = (PERSONA_DIALOGUE + f"4 {huge_partner}\tok .\n5 and you ?\t{huge_response}\n6 bye\tbye .\n")
    d = pd.read_personachat(write(tmp_path / "m.txt", text))
    s = d.stats
    assert s.long_texts == 2 and f"{tmp_path / 'm.txt'}:4: text of {len(huge_partner)} characters cut to its " \
        f"first {pd.MAX_TEXT_CHARS}" in s.notes
    ex = pd.make_examples(d)
    assert len(ex) == 5 and max(len(u) for e in ex for u in e.history + [e.response]) == pd.MAX_TEXT_CHARS

    max_len = 256
    feats, st = pd.sft_features(gpt2, ex, "generate", max_len=max_len)
    # the long partner message cannot be dropped where it is the last one (ex[2]), nor the long response (ex[3]);
    # in ex[4] both are old history, dropped: it fits
    assert len(feats) == 3 and st.overlong == st.left_out == 2 and st.truncated == 3
    assert gpt2.decode(feats[2]["input_ids"]).endswith("Reply:\nbye .<|endoftext|>")
    assert all(len(f["input_ids"]) <= max_len for f in feats)
    feats, st = pd.mixed_task_features(gpt2, ex, max_len=max_len)
    assert all(len(f["input_ids"]) <= max_len for f in feats) and st.left_out == len(ex) * 2 - len(feats) > 0
    feats, st = pd.dpo_features(gpt2, ex, ["no ."] * len(ex), max_len=max_len)
    assert len(feats) == 3 and st.left_out == 2
    assert all(len(f[k]) <= max_len for f in feats for k in ("chosen_input_ids", "rejected_input_ids"))
    st = pd.EncodeStats()
    for e in ex:
        ids, _ = pd.encode_generation_prompt(gpt2, e, "generate", max_len=max_len, stats=st)
        assert len(ids) <= max_len and gpt2.decode(ids).endswith("Reply:\n")
    assert st.examples == 5 and st.cut == st.overlong == 1   # ex[2]'s; ex[3]'s long text is no part of its prompt
    assert "1 still over the limit (0 left out, 1 prompts cut)" in st.summary()


# ---------------------------------------------------------------------------------------------- model files

TINY_GPT2 = M.GPT2Config(vocab_size=1000, n_positions=64, n_embd=32, n_layer=1, n_head=2)
TINY_LLAMA = M.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=300)


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    return M.save_model(M.build_model(TINY_GPT2), tmp_path / "tiny")


@pytest.mark.parametrize("content,says", [(b"", "(0 bytes"), (random.Random(0).randbytes(4096), "(4096 bytes"),
                                          ((40).to_bytes(8, "little") + b'{"w": {"dtype": "F32"}}', "(31 bytes")],
                         ids=["empty", "random", "short-header"])
def test_bad_safetensors_names_the_file(tiny_dir, content, says):
    """Was: already a CheckpointError naming the file, but "(truncated download?)" even for garbage, without
    the file's size."""
    write(tiny_dir / "model.safetensors", content)
    with pytest.raises(M.CheckpointError) as e:
        M.load_model(tiny_dir)
    assert str(e.value).startswith(f"{tiny_dir / 'model.safetensors'}: not a complete safetensors file (")
    assert says in str(e.value)


@pytest.mark.parametrize("content,says", [("", "empty file"), ("  \n", "empty file"), ("{not json", "not valid JSON"),
                                          (b"\xff\xfe\xfa\x00garbage", "not valid JSON"),
                                          ("[1, 2]", "expected a JSON object, got list")],
                         ids=["empty", "blank", "invalid", "binary", "list"])
def test_bad_config_json_names_the_file(tiny_dir, content, says):
    """Was: a bare JSONDecodeError / AttributeError that named no file."""
    write(tiny_dir / "config.json", content)
    for load in (M.load_model, M.read_config):
        with pytest.raises(M.CheckpointError, match=f"^{re.escape(str(tiny_dir / 'config.json'))}: {says}"):
            load(tiny_dir)


@pytest.mark.parametrize("cfg,drop,change,says", [
    (TINY_GPT2, ["n_embd"], {}, "lacks 'n_embd', needed to build a gpt2 model"),
    (TINY_LLAMA, ["vocab_size", "hidden_size"], {}, "lacks 'vocab_size', 'hidden_size', needed"),
    (TINY_GPT2, [], {"n_head": "2"}, "'n_head' must be a positive integer, got '2'"),
    (TINY_LLAMA, [], {"num_hidden_layers": True}, "'num_hidden_layers' must be a positive integer, got True"),
], ids=["gpt2-no-n_embd", "llama-no-sizes", "gpt2-str", "llama-bool"])
def test_config_without_shape_keys_names_file_and_key(tmp_path, cfg, drop, change, says):
    """Was: the family's default filled a missing key (GPT-2 small's n_embd=768), and the error that followed
    blamed model.safetensors for a shape mismatch; a wrong type failed deep inside torch."""
    d = M.save_model(M.build_model(cfg), tmp_path / "m")
    hf = {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k not in drop}
    write(d / "config.json", json.dumps({**hf, **change}))
    with pytest.raises(M.CheckpointError, match=f"^{re.escape(str(d / 'config.json'))}: {re.escape(says)}"):
        M.load_model(d)


def test_read_config_gives_positions_and_vocabulary_before_loading(tmp_path, tiny_dir, gpt2):
    """Was: no read_config / max_positions. check_tokenizer_fits refused already; checked here through them."""
    cfg = M.read_config(tiny_dir)
    assert cfg == TINY_GPT2 and M.max_positions(cfg) == 64
    assert M.max_positions(M.read_config(M.save_model(M.build_model(TINY_LLAMA), tmp_path / "llama"))) == 300
    with pytest.raises(pd.TokenizerError, match=r"'gpt2' has 50257 ids but the model's embedding has only 1000 rows"):
        pd.check_tokenizer_fits(gpt2, cfg.vocab_size)
    with pytest.raises(pd.TokenizerError, match="50257 ids .* only 1000 rows"):
        pd.check_tokenizer_fits(gpt2, M.load_model(tiny_dir))
    pd.check_tokenizer_fits(gpt2, 50257)
