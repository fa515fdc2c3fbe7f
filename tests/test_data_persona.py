"""data.py (datasets): parsers, examples, splits, persona labels, prompts, encoding and batches.

References: the published sizes of PERSONA-CHAT / ConvAI2 valid (1000 dialogues, 7801 examples, 20
candidates), hand-derived expectations for hand-made files, prompt snapshots written out here, and the
Hugging Face GPT-2 tokenizer (test-only oracle) for the token ids of the masks."""
import dataclasses
import json

import pytest
import torch

from conftest import shared_file
import data as pd
from extras import data_stats

PC_VALID = "data/personachat/valid_self_original.txt"
CONVAI2_VALID = "data/convai2/valid_self_original.txt"


# ---------------------------------------------------------------------------------------------------
# tokenizers


class HFGPT2:
    """Adapter with data.py's Tokenizer interface over Hugging Face's GPT-2 tokenizer (test-only oracle)."""

    def __init__(self, d):
        from transformers import GPT2TokenizerFast
        self.hf = GPT2TokenizerFast(vocab=str(d / "encoder.json"), merges=str(d / "vocab.bpe"))
        assert self.hf.encode("hello world") == [31373, 995]  # the published GPT-2 ids
        self.eos_id = self.hf.convert_tokens_to_ids("<|endoftext|>")
        self.bos_id = self.eos_id
        self.pad_id = self.eos_id
        self.stop_ids = [self.eos_id]
        self.vocab_size = 50257
        self.has_chat = False

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids):
        return self.hf.decode(ids)


class FakeChat(HFGPT2):
    """A ChatML-like instruct tokenizer: <|im_start|>=50257, <|im_end|>=50258 (reply terminator)."""
    IM_START, IM_END = 50257, 50258

    def __init__(self, d):
        super().__init__(d)
        self.has_chat = True
        self.stop_ids = [self.IM_END, self.eos_id]

    def chat(self, messages, add_generation_prompt=True):
        ids = []
        for m in messages:
            ids += [self.IM_START] + self.encode(m["role"] + "\n" + m["content"]) + [self.IM_END] + self.encode("\n")
        if add_generation_prompt:
            ids += [self.IM_START] + self.encode("assistant\n")
        return ids

    def decode(self, ids):
        return self.hf.decode([i for i in ids if i < 50257])


@pytest.fixture(scope="module")
def ref_gpt2():
    return HFGPT2(shared_file("tokenizers/gpt2/encoder.json").parent)


@pytest.fixture(scope="module")
def gpt2():
    """Our GPT-2 tokenizer (data.load_tokenizer); ref_gpt2 is the reference it is checked against."""
    return pd.load_tokenizer(shared_file("tokenizers/gpt2/encoder.json").parent)


@pytest.fixture(scope="module")
def pc_valid():
    d = pd.read_personachat(shared_file(PC_VALID))
    return d, pd.make_examples(d)


def write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------------
# parsers on the real files


def test_personachat_valid_sizes(pc_valid):
    dialogues, examples = pc_valid
    assert len(dialogues) == 1000 and len(examples) == 7801  # the published valid size
    assert dialogues.stats.dialogues == 1000 and dialogues.stats.examples == 7801
    assert all(len(d.personas) in (3, 4, 5) for d in dialogues)
    assert len({e.dialogue_id for e in examples}) == 1000
    # the file's first dialogue, read by hand
    e0, e1 = examples[0], examples[1]
    assert e0.personas == ["i read twenty books a year.", "i am a stunt double as my second job.",
                           "i only eat kosher.", "i was raised in a single parent household."]
    assert e0.history == ["hello what are doing today ?"]
    assert e0.response == "i am good , i just got off work and tired , i have two jobs ."
    assert e1.history == ["hello what are doing today ?", e0.response, "i just got done watching a horror movie"]
    assert e1.response == "i rather read , i have read about 20 books this year ."
    assert e0.candidates is None
    # history always ends with the partner's message and has odd length (partner opens in these files)
    assert all(len(e.history) % 2 == 1 for e in examples)


def test_convai2_valid_candidates():
    d = pd.read_personachat(shared_file(CONVAI2_VALID))
    ex = pd.make_examples(d, labeler=None)
    assert len(d) == 1000 and len(ex) == 7801
    assert all(len(e.candidates) == 20 for e in ex)
    assert all(e.candidates[-1] == e.response for e in ex)  # ParlAI puts the gold reply last
    assert all(e.persona_label is None for e in ex)


def test_example_json_round_trip(pc_valid):
    _, ex = pc_valid  # an Example is plain JSON data: asdict -> json -> Example(**d) gives it back
    for e in ex[:50]:
        assert pd.Example(**json.loads(json.dumps(dataclasses.asdict(e)))) == e
    with pytest.raises(TypeError, match="response"):
        pd.Example(**{"personas": [], "history": []})


def test_read_dialogues_dispatch(tmp_path):
    p = write(tmp_path, "x.jsonl", json.dumps([["a b."], ["hi"], "yo"]) + "\n")
    assert pd.make_examples(pd.read_dialogues(p))[0].response == "yo"


# ---------------------------------------------------------------------------------------------------
# hand-made files: rules and malformed input

GOOD = ("1 your persona: i love cats.\n"
        "2 your persona: i am a nurse.\n"
        "3 __SILENCE__\thello , i am a nurse .\t\ta|b|hello , i am a nurse .\n"
        "4 nice , do you have pets ?\tyes , two cats .\n"
        "1 your persona: i ski.\n"
        "2 hi\they\n")


def test_silence_opener_and_candidates(tmp_path):
    d = pd.read_personachat(write(tmp_path, "g.txt", GOOD))
    ex = pd.make_examples(d)
    assert [len(x.turns) for x in d] == [2, 1] and d.stats.silence_openers == 1
    assert ex[0].history == [] and ex[0].candidates == ["a", "b", "hello , i am a nurse ."]
    assert ex[1].history == ["hello , i am a nurse .", "nice , do you have pets ?"]
    assert ex[2].personas == ["i ski."] and ex[2].history == ["hi"] and ex[2].dialogue_id == 1


def test_both_and_revised_files(tmp_path):
    both = "1 your persona: i ski.\n2 partner's persona: i swim.\n3 hi\tyo\n"
    d = pd.read_personachat(write(tmp_path, "valid_both_revised.txt", both))
    assert d[0].personas == ["i ski."] and d[0].partner_personas == ["i swim."]
    write(tmp_path, "valid_self_revised.txt", GOOD)
    splits, info = pd.load_splits(tmp_path, variant="revised")
    assert info.carved and sum(len(v) for v in splits.values()) == 3
    with pytest.raises(FileNotFoundError, match="extras/download.py"):
        pd.load_splits(tmp_path / "nowhere")


def test_rules_are_counted(tmp_path):
    text = ("1 your persona: i ski.\n"
            "\n"                                       # blank line
            "2 hi\they\n"
            "4 how are you ?\n"                        # gap in numbering + missing response
            "5 still there ?\tyes\n"
            "3 your persona: i swim.\n"                # new dialogue (number went down) not starting at 1
            "4 hello\thi there\n"
            "1 your persona: lonely persona.\n"        # dialogue without any response
            "2 anyone there ?\n")
    d = pd.read_personachat(write(tmp_path, "r.txt", text))
    s = d.stats
    assert (s.blank_lines, s.numbering_gaps, s.missing_responses, s.empty_dialogues, s.numbering_restarts) == \
        (1, 1, 2, 1, 1)
    ex = pd.make_examples(d)
    assert [e.response for e in ex] == ["hey", "yes", "hi there"]
    assert ex[1].history == ["hi", "hey", "how are you ?", "still there ?"]  # the unanswered message stays
    assert s.examples == 3 and len(d) == 2
    assert any("r.txt:4" in n for n in s.notes)


def test_invalid_utf8(tmp_path):
    p = write(tmp_path, "u.txt", b"1 your persona: i ski.\n2 caf\xe9 ?\tyes\n", mode="wb")
    d = pd.read_personachat(p)
    assert d.stats.invalid_utf8_lines == 1 and pd.make_examples(d)[0].history == ["caf\ufffd ?"]
    with pytest.raises(pd.DataFormatError, match=r"u\.txt:2: invalid UTF-8"):
        pd.read_personachat(p, strict_utf8=True)


@pytest.mark.parametrize("bad_line,lineno,reason", [
    ("hello there\tyes", 3, "number"),                          # unnumbered
    ("3 a\tb\tc\td\te", 3, "tab-separated"),                     # too many fields
    ("3 your persona: late persona.", 3, "persona line after"),  # persona after a turn
])
def test_malformed_parlai(tmp_path, bad_line, lineno, reason):
    p = write(tmp_path, "bad.txt", "1 your persona: i ski.\n2 hi\they\n" + bad_line + "\n")
    with pytest.raises(pd.DataFormatError) as e:
        pd.read_personachat(p)
    msg = str(e.value)
    assert f"bad.txt:{lineno}" in msg and reason in msg and repr(bad_line)[1:12] in msg


def test_baidu_jsonl(tmp_path):
    P1, P2 = ["我喜欢猫。", "我是护士。"], ["我会滑雪。"]
    rows = [[P1, [], "你好，我是护士。", [0, 1]],
            [P2, ["你好，我是护士。"], "你好，我会滑雪。"],
            [P1, ["你好，我是护士。", "你好，我会滑雪。"], "滑雪很酷。", 1],
            [P2, ["新的对话"], "好的", []]]
    p = write(tmp_path, "b.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    d = pd.read_baidu_jsonl(p)
    ex = pd.make_examples(d, labeler=None)
    assert [e.response for e in ex] == ["你好，我是护士。", "滑雪很酷。", "你好，我会滑雪。", "好的"]
    assert [e.persona_label for e in ex] == [1, 1, None, None]  # one-hot, index, no label (labeler None), []
    assert ex[1].history == ["你好，我是护士。", "你好，我会滑雪。"]
    assert ex[0].dialogue_id == ex[1].dialogue_id == ex[2].dialogue_id != ex[3].dialogue_id
    assert d.stats.dialogues == 2 and d.stats.examples == 4
    for bad, reason in [('["a", ["h"], "r"]\n{"x": 1}\n', "expected \\[personas"),
                        ('[["p"], ["h"], "r"]\nnot json\n', "not JSON"),
                        ('[["p"], ["h"], "r"]\n[["p"], ["h"], "r", 7]\n', ".*outside")]:
        with pytest.raises(pd.DataFormatError, match=rf"b2\.jsonl:2: {reason}"):
            pd.read_baidu_jsonl(write(tmp_path, "b2.jsonl", bad))


# ---------------------------------------------------------------------------------------------------
# splits


def test_split_valid(pc_valid):
    _, ex = pc_valid
    v1, v2 = pd.split_valid(ex)
    print(f"\nValid#1 {len(v1)} examples / {len({e.dialogue_id for e in v1})} dialogues, "
          f"Valid#2 {len(v2)} / {len({e.dialogue_id for e in v2})}")
    assert len(v1) + len(v2) == 7801
    assert abs(len(v1) - 6500) <= 10 and abs(len(v2) - 1301) <= 10  # paper: ~6500 / 1301
    assert not ({e.dialogue_id for e in v1} & {e.dialogue_id for e in v2})
    assert [e.response for e in v1 + v2] == [e.response for e in ex]  # file order, nothing lost
    assert pd.split_valid(ex) == (v1, v2)  # deterministic


def test_carve_and_load_splits(tmp_path, pc_valid, capsys):
    _, ex = pc_valid
    parts = pd.carve_splits(ex, limit=100)
    ids = [{e.dialogue_id for e in parts[k]} for k in pd.SPLITS]
    assert all(len(parts[k]) == 100 for k in pd.SPLITS)
    assert all(not (ids[i] & ids[j]) for i in range(4) for j in range(i + 1, 4))
    parts = pd.carve_splits(ex)  # fractions, whole dialogues
    assert sum(len(v) for v in parts.values()) == 7801
    # a data dir with only the valid file: carved, and it says so
    d = tmp_path / "pc" / "personachat"
    d.mkdir(parents=True)
    (d / "valid_self_original.txt").symlink_to(shared_file(PC_VALID))
    splits, info = pd.load_splits(tmp_path / "pc", limit=64)
    assert info.carved and "NOT the paper's splits" in info.message and all(len(v) == 64 for v in splits.values())
    # official layout: valid + (small) train and test files
    (d / "train_self_original.txt").write_text(GOOD)
    (d / "test_self_original.txt").write_text(GOOD)
    splits, info = pd.load_splits(d)
    assert not info.carved and len(splits["train"]) == 3 and len(splits["test"]) == 3
    assert len(splits["valid1"]) + len(splits["valid2"]) == 7801
    all_ids = [{e.dialogue_id for e in splits[k]} for k in pd.SPLITS]
    assert sum(len(s) for s in all_ids) == len(set().union(*all_ids))  # ids unique across files
    data_stats.main(["--data-dir", str(d)])
    out = capsys.readouterr().out
    assert "| Train | 2 | 3 |" in out and "| Test | 2 | 3 |" in out and "Valid#1" in out
    assert "valid_self_original.txt (all of it):" in out and "of 7801 examples" in out


def test_data_stats_refuses_a_limit_below_one(capsys):
    """issue 23: --limit -1 was a slice [:-1]: one example dropped per split, without a word."""
    with pytest.raises(SystemExit) as e:
        data_stats.main(["--data-dir", "x", "--limit", "-1"])
    assert e.value.code == 2 and "--limit: '-1': must be a whole number of at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# persona labels


@pytest.mark.parametrize("response,label", [
    ("i rather read , i have read about 20 books this year .", 0),   # read, book, year
    ("yes it is neat , i stunt double , it is so much fun and hard work .", 1),
    ("nice , i only have one parent so now i help out my mom .", 3),  # parent (ratio 1/4)
    ("but a good movie is always good .", None),                      # nothing in common
    ("i like it , i love it , i really do .", None),                  # only stop words
    ("kosher food only for me", 2),
])
def test_lexical_labels(response, label):
    personas = ["i read twenty books a year.", "i am a stunt double as my second job.",
                "i only eat kosher.", "i was raised in a single parent household."]
    assert pd.lexical_persona_label(personas, response) == label


def test_lexical_labels_rules():
    assert pd.content_words("I LOVED dogs, she loves reading books") == {"dog", "read", "book"}
    assert {pd._stem(w) for w in ("bakes", "baked", "baking", "bake")} == {"bak"}
    assert pd.content_words("i've") == set()  # apostrophes split words; "i", "ve" are stop words
    # tie on overlap -> higher ratio wins; full tie -> lower index
    assert pd.lexical_persona_label(["i have a dog and a cat and a fish.", "my dog barks."], "my dog") == 1
    assert pd.lexical_persona_label(["dogs rule.", "dogs rule."], "dogs") == 0
    assert pd.lexical_persona_label(["我喜欢猫。", "我是护士。"], "我在给我的小猫喂食呢。") == 0
    assert pd.lexical_persona_label(["我喜欢猫。", "我是护士。"], "今天天气很好。") is None
    # one CJK test (BERT's ideograph ranges) for content words, detect_lang and WordPiece: kana/hangul are not CJK
    assert pd.CJK_CHAR.fullmatch("猫") and pd.CJK_CHAR.fullmatch("\u3400") and not pd.CJK_CHAR.search("カナ한글a")
    assert pd.content_words("\u3400\u3401") == {"\u3400", "\u3401", "\u3400\u3401"}
    assert pd.detect_lang([pd.Example(["カナ"], [], "한글", None, 0)]) == "en"


def test_label_distribution_on_valid(pc_valid):
    _, ex = pc_valid
    dist = pd.label_distribution(ex)
    print(f"\nlexical labels on PERSONA-CHAT valid: {dist}")
    assert dist["total"] == 7801 and 0.2 < dist["labelled"] / 7801 < 0.8
    assert dist["labelled"] + dist["by_index"][None] == 7801


def test_relabel():
    ex = [pd.Example(["i ski.", "i swim."], ["hi"], "i swim a lot", None, 0),
          pd.Example(["i ski.", "i swim."], ["hi"], "hello", 0, 1)]
    assert [e.persona_label for e in pd.relabel(ex, [1, None])] == [1, None]
    assert [e.persona_label for e in ex] == [None, 0]  # copies: the originals keep their labels
    with pytest.raises(ValueError, match="1 labels for 2 examples"):
        pd.relabel(ex, [1])


# ---------------------------------------------------------------------------------------------------
# prompts: snapshots

EX = pd.Example(personas=["i have two dogs.", "i like to work on vintage cars."],
                history=["hi ! how are you doing tonight ?", "i am doing great . just relaxing with my two dogs .",
                         "great . in my spare time i do volunteer work ."],
                response="that is neat . what kind of volunteer work do you do ?", persona_label=1, dialogue_id=0)
EX_ZH = pd.Example(personas=["我喜欢猫。", "我是护士。"], history=["你好呀。"], response="你好，我刚下班。",
                   persona_label=1, dialogue_id=0)

CONV_EN = ("Conversation:\nPartner: hi ! how are you doing tonight ?\n"
           "You: i am doing great . just relaxing with my two dogs .\n"
           "Partner: great . in my spare time i do volunteer work .\n\n")
SNAPSHOTS = {
    ("select", "en"): (
        "Here is what you know about yourself and the conversation so far. Which single sentence about yourself "
        "should your next reply build on? Answer with its number, or 0 if none of them fits.\n\nAbout you:\n"
        "1. i have two dogs.\n2. i like to work on vintage cars.\n\n" + CONV_EN +
        "Number of the sentence to build on:\n", "2"),
    ("select_sentence", "en"): (  # the authors' target: "k.sentence", the sentence as the list writes it
        "Here is what you know about yourself and the conversation so far. Which single sentence about yourself "
        "should your next reply build on? Answer with that sentence as it is numbered below, or \"No personal "
        "description.\" if none of them fits.\n\nAbout you:\n1.i have two dogs.\n2.i like to work on vintage cars.\n\n"
        + CONV_EN + "The sentence to build on:\n", "2.i like to work on vintage cars."),
    ("generate", "en"): (
        "You are taking part in a conversation as the person described below.\n\nAbout you:\n"
        "- i have two dogs.\n- i like to work on vintage cars.\n\n" + CONV_EN +
        "Keep this in mind for your reply: i like to work on vintage cars.\nWrite your next reply.\nReply:\n",
        EX.response),
    ("history", "en"): ("Continue the conversation below with your next reply.\n\n" + CONV_EN + "Reply:\n",
                        EX.response),
    ("noprompt", "en"): ("i have two dogs.\ni like to work on vintage cars.\nhi ! how are you doing tonight ?\n"
                         "i am doing great . just relaxing with my two dogs .\n"
                         "great . in my spare time i do volunteer work .\n", EX.response),
    ("select", "zh"): (
        "下面是关于你自己的描述和目前的对话。你接下来的回复应该以哪一句描述为依据？请写出它的编号；如果都不合适，"
        "请写 0。\n\n关于你：\n1. 我喜欢猫。\n2. 我是护士。\n\n对话：\n对方: 你好呀。\n\n依据的句子编号：\n", "2"),
    ("select_sentence", "zh"): (
        "下面是关于你自己的描述和目前的对话。你接下来的回复应该以哪一句描述为依据？请照下面的编号写出那一句；如果都不合适，"
        "请写“无需个性化信息。”\n\n关于你：\n1。我喜欢猫。\n2。我是护士。\n\n对话：\n对方: 你好呀。\n\n依据的句子：\n",
        "2。我是护士。"),
    ("generate", "zh"): (
        "你正在以下面描述的身份参与一段对话。\n\n关于你：\n- 我喜欢猫。\n- 我是护士。\n\n对话：\n对方: 你好呀。\n\n"
        "回复时请记住：我是护士。\n请写出你的下一句回复。\n回复：\n", "你好，我刚下班。"),
    ("history", "zh"): ("请接着下面的对话写出你的下一句回复。\n\n对话：\n对方: 你好呀。\n\n回复：\n", "你好，我刚下班。"),
    ("noprompt", "zh"): ("我喜欢猫。\n我是护士。\n你好呀。\n", "你好，我刚下班。"),
}


@pytest.mark.parametrize("mode,lang", list(SNAPSHOTS))
def test_prompt_snapshot(mode, lang):
    ex = EX if lang == "en" else EX_ZH
    assert pd.prompt_and_target(ex, mode, lang) == SNAPSHOTS[(mode, lang)]


def test_prompt_variants():
    # no label -> the selection target and the highlighted persona are the sentinel
    ex = pd.Example(EX.personas, [], "hello !", None, 0)
    prompt, target = pd.prompt_and_target(ex, "select")
    assert target == "0" and "(nobody has spoken yet)" in prompt
    assert "Keep this in mind for your reply: No persona sentence applies.\n" in pd.prompt_and_target(ex, "generate")[0]
    # persona=None is the sentinel, never the gold persona (the trap of the authors' code)
    p, _ = pd.prompt_and_target(EX, "generate", persona=None)
    assert "Keep this in mind for your reply: No persona sentence applies.\n" in p
    # select-then-generate highlights the persona given, never the gold one
    p, t = pd.prompt_and_target(EX, "generate", persona="i have two dogs.")
    assert "Keep this in mind for your reply: i have two dogs.\n" in p and t == EX.response
    assert pd.parse_selection(" i have two dogs.\nmore", EX.personas) == "i have two dogs."
    assert pd.parse_selection("vintage cars, I work on them", EX.personas) == EX.personas[1]
    assert pd.parse_selection(pd.NO_PERSONA["en"], EX.personas) is None
    # the trained answer is a number: k -> the k-th sentence; 0 or out of range -> no persona
    assert pd.parse_selection("2", EX.personas) == EX.personas[1]
    assert pd.parse_selection(" 1. i have two dogs.", EX.personas) == EX.personas[0]
    assert pd.parse_selection("0", EX.personas) is None and pd.parse_selection("3", EX.personas) is None
    # the authors' answer: "k.sentence" -> the k-th sentence; their words for none -> no persona
    assert pd.prompt_and_target(ex, "select_sentence")[1] == "No personal description."
    assert pd.prompt_and_target(ex, "select_sentence", "zh")[1] == "无需个性化信息。"
    assert pd.parse_selection("2.i like to work on vintage cars.", EX.personas) == EX.personas[1]
    assert pd.parse_selection("No personal description.", EX.personas) is None
    assert pd.parse_selection("2。我是护士。", EX_ZH.personas, "zh") == EX_ZH.personas[1]
    assert pd.parse_selection("无需个性化信息。", EX_ZH.personas, "zh") is None
    assert pd.detect_lang([EX_ZH]) == "zh" and pd.detect_lang([EX]) == "en"
    with pytest.raises(ValueError, match="unknown prompt mode"):
        pd.prompt_and_target(EX, "chitchat")


# ---------------------------------------------------------------------------------------------------
# encoding: masks, truncation, chat format


@pytest.mark.parametrize("mode", pd.MODES)
def test_mask_positions_gpt2(gpt2, ref_gpt2, pc_valid, mode):
    _, examples = pc_valid
    for ex in examples[:40:7]:
        prompt, target = pd.prompt_and_target(ex, mode)
        f = pd.encode_example(gpt2, ex, mode)
        ids, labels = f["input_ids"], f["labels"]
        n = len(ref_gpt2.encode(prompt))
        assert ids == ref_gpt2.encode(prompt + target) + [50256]
        assert labels[:n] == [-100] * n and -100 not in labels[n:]
        assert labels[n:] == ref_gpt2.encode(target) + [50256]  # label ids = response ids + EOS, exactly
        assert labels[n:] == ids[n:]


def test_prefix_check(gpt2):
    # " world" merges the space into the next token, so "hello " is not a token prefix of "hello world"
    with pytest.raises(pd.PromptPrefixError, match="not a prefix"):
        pd.encode_prompt_target(gpt2, "hello ", "world")


def test_truncation_keeps_response_and_personas(gpt2, ref_gpt2, pc_valid):
    _, examples = pc_valid
    ex = next(e for e in examples if len(e.history) >= 9)
    full = pd.encode_example(gpt2, ex, "generate")
    stats = pd.EncodeStats()
    f = pd.encode_example(gpt2, ex, "generate", max_len=len(full["input_ids"]) - 1, stats=stats)
    assert len(f["input_ids"]) < len(full["input_ids"])
    assert stats.truncated == 1 and stats.dropped_utterances == 1 and stats.overlong == 0
    n = f["labels"].count(-100)
    text = ref_gpt2.decode(f["input_ids"][:n])
    assert ex.history[0] not in text and ex.history[1] in text and all(p in text for p in ex.personas)
    assert f["labels"][n:] == ref_gpt2.encode(ex.response) + [50256]
    # far too short: down to the partner's last message, response and personas whole, counted as overlong
    f = pd.encode_example(gpt2, ex, "generate", max_len=20, stats=stats)
    n = f["labels"].count(-100)
    text = ref_gpt2.decode(f["input_ids"][:n])
    assert ex.history[-1] in text and ex.history[-2] not in text and all(p in text for p in ex.personas)
    assert f["labels"][n:] == ref_gpt2.encode(ex.response) + [50256]
    assert stats.overlong == 1 and stats.truncated == 2


def test_chat_format(ref_gpt2):
    tok = FakeChat(shared_file("tokenizers/gpt2/encoder.json").parent)
    f = pd.encode_example(tok, EX, "generate")
    prompt, target = pd.prompt_and_target(EX, "generate")
    user = tok.chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert f["input_ids"][: len(user)] == user and f["labels"][: len(user)] == [-100] * len(user)
    assert f["labels"][len(user):] == ref_gpt2.encode(target) + [FakeChat.IM_END]  # ends at the terminator
    assert pd.encode_prompt(tok, prompt) == user


def test_bos_added_when_distinct(ref_gpt2):
    class WithBos(HFGPT2):
        pass
    tok = WithBos(shared_file("tokenizers/gpt2/encoder.json").parent)
    tok.bos_id = 1  # a tokenizer whose BOS differs from EOS (Llama-style) gets it prepended
    f = pd.encode_example(tok, EX, "history")
    assert f["input_ids"][0] == 1 and f["labels"][0] == -100


# ---------------------------------------------------------------------------------------------------
# features and batches


def test_collate_sft_masks_from_lengths():
    eos = 50256
    feats = [{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]},       # the target ends in EOS = pad id
             {"input_ids": [7, 8, 9, 10, eos], "labels": [-100, -100, 9, 10, eos]}]
    b = pd.collate_sft(feats, pad_id=eos)
    assert b["input_ids"].tolist() == [[5, 6, eos, eos, eos], [7, 8, 9, 10, eos]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[-100, 6, eos, -100, -100], [-100, -100, 9, 10, eos]]
    assert all(v.dtype == torch.long for v in b.values())
    assert pd.IGNORE == -100  # the one ignore index (dpo.py imports it)
    with pytest.raises(ValueError, match="labels"):
        pd.collate_sft([{"input_ids": [1, 2], "labels": [1]}])


def test_mixed_task_features(gpt2, pc_valid):
    _, examples = pc_valid
    ex = examples[:30]
    f1, s1 = pd.mixed_task_features(gpt2, ex, select_ratio=0.5, seed=1)
    f2, _ = pd.mixed_task_features(gpt2, ex, select_ratio=0.5, seed=1)
    f3, _ = pd.mixed_task_features(gpt2, ex, select_ratio=0.5, seed=2)
    tasks = [f["task"] for f in f1]
    assert tasks.count("generate") == 30 and tasks.count("select") == 15 and s1.examples == 45
    assert f1 == f2 and f1 != f3  # deterministic by seed
    assert tasks[:10].count("select") not in (0, 10)  # interleaved, not one block after the other
    b = pd.collate_sft(f1[:4], pad_id=gpt2.pad_id)
    assert set(b) == {"input_ids", "labels", "attention_mask"} and b["input_ids"].shape[0] == 4
    # the selection targets are the gold persona's number in the list (1-based), "0" without a label
    sel, _ = pd.sft_features(gpt2, ex[:5], mode="select")
    for f, e in zip(sel, ex[:5]):
        tgt = [t for t in f["labels"] if t != -100]
        assert gpt2.decode(tgt[:-1]) == (str(e.persona_label + 1) if e.persona_label is not None else "0")
    # select_none_ratio keeps that share of the "0" (no persona) selection features, every labelled one
    n_none = sum(e.persona_label is None for e in ex)
    assert 0 < n_none < 30
    targets = lambda fs: [gpt2.decode([t for t in f["labels"] if t != -100][:-1]) for f in fs if f["task"] == "select"]
    full, _ = pd.mixed_task_features(gpt2, ex, select_none_ratio=1.0)
    quarter, _ = pd.mixed_task_features(gpt2, ex, select_none_ratio=0.25)
    assert targets(full).count("0") == n_none and targets(quarter).count("0") == round(0.25 * n_none)
    assert len(targets(quarter)) - targets(quarter).count("0") == 30 - n_none
    with pytest.raises(ValueError, match="select_none_ratio"):
        pd.mixed_task_features(gpt2, ex, select_none_ratio=1.5)


def test_dpo_features(gpt2, ref_gpt2, pc_valid):
    _, examples = pc_valid
    ex = [e for e in examples if len(e.history) >= 7][:3]
    rejected = ["i do not know .", "ok", "what ?"]
    feats, stats = pd.dpo_features(gpt2, ex, rejected, max_len=None)
    for f, e, r in zip(feats, ex, rejected):
        nc, nr = f["chosen_labels"].count(-100), f["rejected_labels"].count(-100)
        assert nc == nr and f["chosen_input_ids"][:nc] == f["rejected_input_ids"][:nr]  # one prompt
        assert f["chosen_labels"][nc:] == ref_gpt2.encode(e.response) + [50256]
        assert f["rejected_labels"][nr:] == ref_gpt2.encode(r) + [50256]
    # truncation makes both fit with the same prompt
    limit = len(feats[0]["chosen_input_ids"]) - 5
    f = pd.dpo_feature(gpt2, ex[0], rejected[0], max_len=limit)
    assert len(f["chosen_input_ids"]) <= limit and len(f["rejected_input_ids"]) <= limit
    assert f["chosen_input_ids"][: f["chosen_labels"].count(-100)] == \
        f["rejected_input_ids"][: f["rejected_labels"].count(-100)]
    b = pd.collate_dpo(feats, pad_id=gpt2.pad_id)
    assert set(b) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "labels", "attention_mask")}
    assert b["chosen_attention_mask"].sum(1).tolist() == [len(f["chosen_input_ids"]) for f in feats]


def test_llama3_chat_labels():
    """With a real instruct tokenizer (data.py's Llama 3 tiktoken + chat format) the labels are the response's
    ids followed by <|eot_id|>, and the prompt is exactly what generation starts from."""
    tok = pd.load_tokenizer(shared_file("tokenizers/llama3/tokenizer.model").parent)
    assert tok.has_chat
    eot = 128009
    for mode in pd.MODES:
        f = pd.encode_example(tok, EX, mode)
        prompt, target = pd.prompt_and_target(EX, mode)
        n = f["labels"].count(-100)
        assert f["input_ids"][:n] == pd.encode_prompt(tok, prompt)
        assert f["labels"][n:] == tok.encode(target) + [eot]
        assert f["input_ids"][n:] == f["labels"][n:]
    ids, dropped = pd.encode_generation_prompt(tok, EX, "history", max_len=40)
    assert len(ids) <= 40 and dropped == 2 and ids == pd.encode_prompt(tok, pd.build_prompt("history", [], EX.history[2:]))


def test_generation_prompt_truncation(gpt2):
    # at generation time the default highlighted persona is the sentinel, not the gold label's sentence
    text = gpt2.decode(pd.encode_generation_prompt(gpt2, EX, "generate")[0])
    assert "reply: No persona sentence applies.\n" in text and "reply: i like to work" not in text
    text = gpt2.decode(pd.encode_generation_prompt(gpt2, EX, "generate", persona=pd.GOLD)[0])
    assert "reply: i like to work on vintage cars.\n" in text
    ids, dropped = pd.encode_generation_prompt(gpt2, EX, "select")
    assert dropped == 0 and ids == gpt2.encode(pd.prompt_and_target(EX, "select")[0])
    ids, dropped = pd.encode_generation_prompt(gpt2, EX, "generate", persona="i have two dogs.", max_len=100)
    text = gpt2.decode(ids)
    assert len(ids) <= 100 and dropped >= 1 and EX.history[-1] in text and "Keep this in mind for your reply: i have two dogs." in text
