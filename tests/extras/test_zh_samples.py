"""extras/zh_samples.py: the Chinese sample files converted to Baidu JSON lines, then read by data.py.

References: the sample files themselves (block counts, first blocks read by hand) and hand-made malformed files."""
import json

import pytest
from conftest import shared_file

import data
from extras import zh_samples

TRAIN = "data/zh_samples/Person_Dialog_ZH_train.txt"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The two sample files converted into a data directory (train.jsonl, test.jsonl)."""
    src = shared_file(TRAIN).parent
    out = tmp_path_factory.mktemp("zh")
    assert zh_samples.convert(src, out) == {"train": out / "train.jsonl", "test": out / "test.jsonl"}
    return out


def test_zh_samples(converted):
    dialogues = data.read_dialogues(converted / "train.jsonl")
    ex = data.make_examples(dialogues)
    assert len(ex) == 36 + 1  # 36 [SEP] lines, the last block has none after it
    e0 = ex[0]
    assert e0.personas == ["我会在两个月内搬去上海。", "我最喜欢的乐队是黑豹乐队。", "我在加油站做出纳。"]
    assert e0.history == [] and e0.response == "你的歌声真美妙，离你很远都听见了。"
    # the other speaker answers; both speakers of a conversation share its dialogue_id
    b = next(e for e in ex if e.response == "我以为没人呢，被我的歌声吓到了吗？")
    assert b.personas[0] == "我喜欢唱歌。" and b.history == [e0.response] and b.dialogue_id == e0.dialogue_id
    # every example's history is the conversation so far: rebuilt it from the file order of blocks
    text = shared_file(TRAIN).read_text(encoding="utf-8")
    blocks = [b.strip().split("\n") for b in text.split("[SEP]") if b.strip()]
    by_resp = {(tuple(e.history), e.response) for e in ex}
    for blk in blocks:
        hist = [u for u in blk[1].split("<|endoftext|>") if u]
        resp = blk[2].replace("<|endoftext|>", "")
        assert (tuple(hist), resp) in by_resp
    assert dialogues.stats.dialogues == 3
    # one [personas, history, response] array per block, and the test file reads too
    rows = [json.loads(line) for line in (converted / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(blocks) and rows[0] == [e0.personas, [], e0.response]
    assert len(data.read_dialogues(converted / "test.jsonl")) > 0
    splits, info = data.load_splits(converted)  # train.jsonl + test.jsonl, no valid: carved parts
    assert info.carved and sum(len(v) for v in splits.values()) > 0


def test_empty_response_is_counted(tmp_path):
    (tmp_path / "Person_Dialog_ZH_train.txt").write_text(
        "我会滑雪。\n<|endoftext|>\n<|endoftext|>\n[SEP]\n我会滑雪。\n<|endoftext|>\n好<|endoftext|>\n", encoding="utf-8")
    zh_samples.convert(tmp_path, tmp_path / "out")
    d = data.read_dialogues(tmp_path / "out" / "train.jsonl")
    assert d.stats.missing_responses == 1 and [e.response for e in data.make_examples(d)] == ["好"]


def test_zh_malformed(tmp_path):
    p = tmp_path / "z.txt"
    p.write_text("我会滑雪。\n<|endoftext|>\n你好<|endoftext|>\n[SEP]\n我会滑雪。\n你好<|endoftext|>\n"
                 "嗨<|endoftext|>\n", encoding="utf-8")
    with pytest.raises(data.DataFormatError, match=r"z\.txt:6: history line must start"):
        zh_samples.read_zh_samples(p)
    p = tmp_path / "z2.txt"
    p.write_text("我会滑雪。\n<|endoftext|>\n[SEP]\n", encoding="utf-8")
    with pytest.raises(data.DataFormatError, match=r"z2\.txt:1: block of 2 lines"):
        zh_samples.read_zh_samples(p)
    p = tmp_path / "z3.txt"
    p.write_bytes("我会滑雪。\n<|endoftext|>\n".encode() + b"\xff<|endoftext|>\n")
    with pytest.raises(data.DataFormatError, match=r"z3\.txt:3: invalid UTF-8"):
        zh_samples.read_zh_samples(p)
    with pytest.raises(FileNotFoundError, match="Person_Dialog_ZH_train.txt"):
        zh_samples.convert(tmp_path / "nowhere", tmp_path / "out")
