"""The data the paper used: revised personas for train/valid with the original test set, the Baidu-Persona-Chat
Valid#1/Valid#2 sizes, the PAL authors' JSON-array files with lists of persona indices, and a history cut to
its last K utterances."""
import json

import pytest

from conftest import shared_file
import data as pd


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def parlai(persona: str, n_dialogues: int) -> str:
    """n_dialogues ParlAI dialogues of two turns each whose persona sentence is `persona`."""
    return "".join(f"1 your persona: {persona}\n2 hi {i}\thello .\n3 how are you ?\tfine .\n"
                   for i in range(n_dialogues))


def baidu_rows(n_dialogues: int) -> list[list]:
    """n_dialogues Baidu dialogues of two rows each: [personas, history, response, label]."""
    rows = []
    for i in range(n_dialogues):
        personas = [f"我喜欢猫{i}。", "我住在北京。", "我是老师。"]
        rows.append([personas, [f"你好{i}"], "你好，我喜欢猫。", [0]])
        rows.append([personas, [f"你好{i}", "你好，我喜欢猫。", "你住哪里？"], "我住在北京。", [1, 2]])
    return rows


def test_revised_personas_train_valid_revised_test_original(tmp_path):
    for kind in ("train", "valid", "test"):
        write(tmp_path / f"{kind}_self_original.txt", parlai("i am original.", 2))
        write(tmp_path / f"{kind}_self_revised.txt", parlai("i am revised.", 2))
    splits, info = pd.load_splits(tmp_path, personas="revised")
    assert not info.carved and "train revised, valid revised, test original" in info.message
    assert {e.personas[0] for k in ("train", "valid1", "valid2") for e in splits[k]} == {"i am revised."}
    assert {e.personas[0] for e in splits["test"]} == {"i am original."}
    original, _ = pd.load_splits(tmp_path, personas="original")
    assert {e.personas[0] for v in original.values() for e in v} == {"i am original."}
    assert pd.load_splits(tmp_path)[0] == original  # the default is still every file original


@pytest.mark.parametrize("missing", ["train_self_revised.txt", "valid_self_revised.txt", "test_self_original.txt"])
def test_revised_personas_name_the_missing_file(tmp_path, missing):
    for name in ("train_self_revised.txt", "valid_self_revised.txt", "test_self_original.txt"):
        if name != missing:
            write(tmp_path / name, parlai("i ski.", 1))
    with pytest.raises(FileNotFoundError, match=missing):
        pd.load_splits(tmp_path, personas="revised")
    with pytest.raises(ValueError, match="unknown personas"):
        pd.load_splits(tmp_path, personas="both")


def test_valid1_target_by_file_format(tmp_path, monkeypatch):
    assert pd.VALID1_TARGETS == {"personachat": 6500, "baidu": 14_000}
    lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in baidu_rows(5)) + "\n"
    for kind in ("train", "valid", "test"):
        write(tmp_path / "zh" / f"{kind}.jsonl", lines)
        write(tmp_path / "en" / f"{kind}_self_original.txt", parlai("i ski.", 5))
    monkeypatch.setitem(pd.VALID1_TARGETS, "baidu", 4)        # 2 dialogues of 2 examples
    monkeypatch.setitem(pd.VALID1_TARGETS, "personachat", 6)  # 3 dialogues of 2 examples
    zh, _ = pd.load_splits(tmp_path / "zh")
    en, _ = pd.load_splits(tmp_path / "en")
    assert (len(zh["valid1"]), len(zh["valid2"])) == (4, 6)
    assert (len(en["valid1"]), len(en["valid2"])) == (6, 4)


def test_list_of_persona_indices(tmp_path):
    p = write(tmp_path / "b.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in baidu_rows(1)) + "\n")
    ex = pd.make_examples(pd.read_baidu_jsonl(p))
    assert [e.persona_label for e in ex] == [0, 1]  # [1, 2]: the first index, as the authors' label[0]
    for label, reason in (([0, 7], "label 7 outside 0..2"), ([-1, 2], "label -1 outside 0..2")):
        row = [["我喜欢猫。", "我住在北京。", "我是老师。"], ["你好"], "你好。", label]
        bad = write(tmp_path / "bad.jsonl", json.dumps(baidu_rows(1)[0], ensure_ascii=False) + "\n" +
                    json.dumps(row, ensure_ascii=False) + "\n")
        with pytest.raises(pd.DataFormatError, match=rf"bad.jsonl:2: {reason}"):
            pd.read_baidu_jsonl(bad)
    row = [["我喜欢猫。"], ["你好"], "你好。", [-1]]
    none = write(tmp_path / "none.jsonl", json.dumps(row, ensure_ascii=False) + "\n")
    assert pd.make_examples(pd.read_baidu_jsonl(none))[0].persona_label is None  # [-1]: no persona


def test_authors_json_array_file(tmp_path):
    """The authors' train_ch.txt: one (pretty-printed) JSON array of [personas, history, response, [labels]]."""
    rows = baidu_rows(2)
    p = write(tmp_path / "train_ch.txt", json.dumps(rows, ensure_ascii=False, indent=2))
    assert pd.file_format(p) == "baidu"
    d = pd.read_dialogues(p)
    ex = pd.make_examples(d)
    assert len(d) == 2 and [e.response for e in ex] == [r[2] for r in rows]
    assert [e.persona_label for e in ex] == [0, 1, 0, 1] and ex[1].history == rows[1][1]
    assert d[1].turns[0].source == f"{p}:row 2"
    one = write(tmp_path / "one.json", json.dumps(rows[:1], ensure_ascii=False))  # a single-row array
    assert len(pd.make_examples(pd.read_dialogues(one))) == 1
    bad = rows[:1] + [rows[1][:3] + [[9]]]
    with pytest.raises(pd.DataFormatError, match=r"bad.json:row 1: label 9 outside 0..2"):
        pd.read_dialogues(write(tmp_path / "bad.json", json.dumps(bad, ensure_ascii=False)))
    with pytest.raises(pd.DataFormatError, match=r"short.json:row 0: expected \[personas"):
        pd.read_dialogues(write(tmp_path / "short.json", json.dumps([["a"]])))


def test_last_turns(tmp_path):
    ex = pd.make_examples(pd.read_personachat(shared_file("data/personachat/valid_self_original.txt")))[:50]
    lengths = [len(e.history) for e in ex]
    longest = max(lengths)
    assert longest > 3
    cut = pd.last_turns(ex, 3)
    assert all(c.history == e.history[-3:] and c.response == e.response for c, e in zip(cut, ex))
    assert all(e.history == [] for e in pd.last_turns(ex, 0))
    assert pd.last_turns(ex, None) == ex and pd.last_turns(ex, longest) == ex
    assert [len(e.history) for e in ex] == lengths  # the input examples are not changed
    with pytest.raises(ValueError, match=">= 0"):
        pd.last_turns(ex, -1)
