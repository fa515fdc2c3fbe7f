"""Tokenizer files as Hugging Face and Meta ship them, read into plain data for data.py's tokenizer classes:
read_tokenizer(path) -> (kind, keyword arguments), kind "bpe" (the vocabulary and merges as tiktoken ranks, the
pre-tokenizer regex, special tokens and their roles, the chat format), "sentencepiece" or "wordpiece".

    tokenizer.json (byte-level BPE), vocab.json + merges.txt, encoder.json + vocab.bpe    GPT-2, DialoGPT, SmolLM2,
                                                                                           RoBERTa, Llama 3
    [original/]tokenizer.model, tiktoken text format                                      Llama 3 / 3.1
    tokenizer.model, sentencepiece protobuf                                               Llama 2
    vocab.txt                                                                             GPT-2 Chinese (uer), BERT
"""
from __future__ import annotations

import base64
import json
import re
from functools import lru_cache
from pathlib import Path

GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 (tokenizer.json: Sequence[Digits(individual_digits=True), ByteLevel]) = GPT-2's split applied to the
# pieces left between single digits. As one regex: every digit alone, and a whitespace run right before a digit
# is one piece (it ends its Digits piece, where "\s+(?!\S)" would otherwise leave the last space to the next word).
SMOLLM_SPLIT = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
# Llama 3's split (Meta's reference tokenizer.py): case-insensitive contractions, numbers in groups of <= 3 digits.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3's 256 special tokens follow its 128000 BPE ranks; names as in Meta's reference (meta-llama/llama-models).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]


class TokenizerError(ValueError):
    """A tokenizer could not be built or does not fit: the message names the file, key or size at fault."""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used in vocab.json / merges.txt / tokenizer.json.

    Printable latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are shifted to
    chr(256 + k) in byte order, which is why a space shows up as "Ġ" (chr(288)) in GPT-2's files.
    """
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + shifted.index(b)) for b in range(256)}


def _ranks_from_merges(vocab: dict[str, int], merges: list[tuple[str, str]], where: str):
    """GPT-2 style vocab (token string -> id) + ordered merges -> (tiktoken ranks, rank -> id).

    Single bytes get ranks 0..255 (their rank is never compared: tiktoken only ranks pairs), the token made by
    merge k gets rank 256 + k. A vocab token no merge can make is left out: HF's BPE can never produce it either.
    """
    ranks: dict[bytes, int] = {}
    id_of_rank: dict[int, int] = {}
    byte_of = {c: b for b, c in byte_to_unicode().items()}
    for b, ch in byte_to_unicode().items():
        # tiktoken needs every single byte; a byte the vocab lacks (SmolLM2 has no \x04, no 0xF5..0xFF, ...) gets
        # the id -1 and is dropped from the output, as HF's BPE drops a character it has no token for.
        ranks[bytes([b])] = b
        id_of_rank[b] = vocab.get(ch, -1)
    for k, (left, right) in enumerate(merges):
        token = left + right
        if token not in vocab:
            raise TokenizerError(f"{where}: merge {k} ({left!r} {right!r}) makes {token!r}, not in the vocabulary")
        bad = [c for c in token if c not in byte_of]
        if bad:
            raise TokenizerError(f"{where}: token {token!r} has character {bad[0]!r} outside GPT-2's byte alphabet")
        tb = bytes(byte_of[c] for c in token)
        if tb in ranks:  # a second merge making the same token: tiktoken ranks tokens, so the first rank stays
            continue
        ranks[tb] = 256 + k
        id_of_rank[256 + k] = vocab[token]
    return ranks, id_of_rank


def _parse_merges(lines, where: str) -> list[tuple[str, str]]:
    """merges.txt lines ("a b"; "#version" and blank lines skipped) or tokenizer.json's [a, b] pairs."""
    merges = []
    for n, m in enumerate(lines):
        if isinstance(m, str) and (m.startswith("#version") or not m.strip()):
            continue
        parts = m.rstrip("\n").split(" ") if isinstance(m, str) else list(m)
        if len(parts) != 2:
            raise TokenizerError(f"{where}: merge line {n + 1} is not two tokens: {m!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _split_from_pre_tokenizer(pre: dict | None, where: str) -> tuple[str, bool]:
    """tokenizer.json "pre_tokenizer" -> (tiktoken split regex, add_prefix_space). Unknown layouts are an error."""
    if pre is None:
        raise TokenizerError(f"{where}: pre_tokenizer is null; byte-level BPE needs one")
    t = pre.get("type")
    if t == "ByteLevel":
        if not pre.get("use_regex", True):
            raise TokenizerError(f"{where}: ByteLevel pre_tokenizer without regex is not supported")
        return GPT2_SPLIT, bool(pre.get("add_prefix_space", False))
    if t == "Sequence":
        steps = pre.get("pretokenizers", [])
        types = [s.get("type") for s in steps]
        if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return SMOLLM_SPLIT, bool(steps[1].get("add_prefix_space", False))
        if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            s = steps[0]
            if s.get("behavior") != "Isolated" or s.get("invert"):
                raise TokenizerError(f"{where}: Split pre_tokenizer must be Isolated and not inverted, got {s}")
            return s["pattern"]["Regex"], bool(steps[1].get("add_prefix_space", False))
        raise TokenizerError(f"{where}: unsupported pre_tokenizer sequence {types}")
    raise TokenizerError(f"{where}: unsupported pre_tokenizer type {t!r}")


def _read_json(path: Path, missing: dict | None = None) -> dict:
    """The JSON object in `path`; a missing file is an error, or `missing` (e.g. {}) when given."""
    if not path.is_file():
        if missing is not None:
            return missing
        raise TokenizerError(f"missing file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # re-raised naming the file
        raise TokenizerError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _chat_settings(specials: dict[str, int], template: str | None) -> dict:
    """Pick the chat format from the special tokens; SmolLM2's default system prompt comes from its template."""
    if "<|start_header_id|>" in specials and "<|eot_id|>" in specials:
        return {"chat_format": "llama3"}
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        # the template's jinja string literal holds the newline either raw or as the two characters "\n"
        m = re.search(r"'<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>(?:\n|\\n)'", template or "", re.S)
        return {"chat_format": "chatml", "default_system": m.group(1) if m else None}
    return {}


def _bpe_roles(specials: dict[str, int], cfg: dict, model_type: str | None) -> dict:
    """bos / eos / pad / stop tokens of a byte-level BPE tokenizer, from tokenizer_config.json or the family default."""
    # tokenizer_config.json stores a special as "<s>" or as {"content": "<s>", ...}
    bos, eos, pad = (v.get("content") if isinstance(v, dict) else v
                     for v in (cfg.get("bos_token"), cfg.get("eos_token"), cfg.get("pad_token")))
    if model_type == "roberta" or "<s>" in specials and "</s>" in specials and "<|endoftext|>" not in specials:
        bos, eos, pad = bos or "<s>", eos or "</s>", pad or "<pad>"
    elif "<|begin_of_text|>" in specials:                        # Llama 3
        bos, eos = bos or "<|begin_of_text|>", eos or "<|end_of_text|>"
        right_pad = "<|finetune_right_pad_id|>"
        pad = pad if pad in specials else right_pad if right_pad in specials else eos
    elif "<|im_start|>" in specials:                             # SmolLM2: eos is <|im_end|>, pad = eos
        bos, eos = bos or "<|im_start|>", eos or "<|im_end|>"
    else:                                                        # GPT-2 / DialoGPT: <|endoftext|> everywhere
        bos, eos = bos or eos or "<|endoftext|>", eos or "<|endoftext|>"
    if pad not in specials:
        pad = eos
    stops = [eos]
    for extra in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>"):
        # Llama 3 instruct ends a turn with <|eot_id|> (and <|eom_id|> for tool calls), its base model with
        # <|end_of_text|>; SmolLM2 ends with <|im_end|> but may still emit <|endoftext|>.
        if extra in specials and extra not in stops and ("<|begin_of_text|>" in specials or "<|im_start|>" in specials):
            stops.append(extra)
    return {"bos": bos, "eos": eos, "pad": pad, "stops": stops}


def _bpe_from_vocab_merges(name: str, vocab: dict[str, int], merges, split: str, specials: dict[str, int],
                           where: str, cfg: dict, model_type: str | None, template: str | None = None,
                           add_prefix_space: bool = False) -> tuple[str, dict]:
    ranks, id_of_rank = _ranks_from_merges(vocab, _parse_merges(merges, where), where)
    # keep the specials the vocab file lists (RoBERTa's <s>, GPT-2's <|endoftext|>) even when no added_tokens say so
    for t in ("<|endoftext|>", "<s>", "</s>", "<pad>", "<unk>", "<mask>"):
        if t in vocab and t not in specials:
            specials[t] = vocab[t]
    return "bpe", dict(name=name, ranks=ranks, split=split, id_of_rank=id_of_rank, specials=specials,
                       add_prefix_space=add_prefix_space, **_bpe_roles(specials, cfg, model_type),
                       **_chat_settings(specials, template))


def _load_tokenizer_json(path: Path, cfg: dict, model_type: str | None, template: str | None):
    j = _read_json(path)
    model = j.get("model", {})
    where = str(path)
    if model.get("type") != "BPE":
        raise TokenizerError(f"{where}: model type {model.get('type')!r} is not supported (BPE only)")
    if model.get("byte_fallback"):
        raise TokenizerError(f"{where}: sentencepiece-style BPE (byte_fallback); load tokenizer.model instead")
    split, prefix = _split_from_pre_tokenizer(j.get("pre_tokenizer"), where)
    specials = {a["content"]: a["id"] for a in j.get("added_tokens", [])}
    vocab = dict(model["vocab"])
    for t, i in specials.items():   # added tokens may or may not be listed in model.vocab
        vocab.pop(t, None)
    return _bpe_from_vocab_merges(path.parent.name, vocab, model["merges"], split, specials, where, cfg,
                                  model_type, template, prefix)


_TIKTOKEN_LINE = re.compile(rb"([A-Za-z0-9+/]+=*) (\d+)")


def _load_tiktoken_model(path: Path, cfg: dict) -> tuple[str, dict]:
    """Llama 3 tokenizer.model: lines "base64(token) rank"; the 256 specials follow the last rank."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = _TIKTOKEN_LINE.fullmatch(line.strip())
            if m is None or len(m.group(1)) % 4:  # base64 comes in groups of 4 characters
                raise TokenizerError(f"{path}: line {n} is not 'base64-token rank'")
            ranks[base64.b64decode(m.group(1))] = int(m.group(2))
    specials = {t: len(ranks) + k for k, t in enumerate(LLAMA3_SPECIALS)}
    roles = _bpe_roles(specials, cfg, "llama")
    return "bpe", dict(name=path.parent.name, ranks=ranks, split=LLAMA3_SPLIT, id_of_rank=None, specials=specials,
                       **roles, chat_format="llama3")


def _is_tiktoken_file(path: Path) -> bool:
    """Llama 3's tokenizer.model is text ("base64 rank" lines); sentencepiece's is a binary protobuf."""
    with open(path, "rb") as f:
        head = f.read(256)
    return bool(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\n?", head.split(b"\n")[0] + b"\n"))


def read_tokenizer(path: str | Path) -> tuple[str, dict]:
    """(kind, keyword arguments of its class) for a LOCAL model directory or one tokenizer file, chosen by the
    files present. A hub id is the caller's to resolve (infra.hub.resolve_model_dir)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenizerError(f"{str(path)!r} is not a local file or directory (load_tokenizer reads local files "
                             "only; resolve a hub id with infra.hub.resolve_model_dir first)")
    if p.is_file():
        if p.name == "tokenizer.json":
            return _load_tokenizer_json(p, {}, None, None)
        if p.suffix == ".model":
            return _load_tiktoken_model(p, {}) if _is_tiktoken_file(p) else ("sentencepiece", {"path": p})
        raise TokenizerError(f"{p}: not a tokenizer file (expected tokenizer.json or *.model)")
    config = _read_json(p / "config.json", missing={})
    tcfg = _read_json(p / "tokenizer_config.json", missing={})
    model_type = config.get("model_type")
    template = tcfg.get("chat_template")
    if template is None and (p / "chat_template.jinja").exists():
        template = (p / "chat_template.jinja").read_text(encoding="utf-8")
    tclass = tcfg.get("tokenizer_class") or config.get("tokenizer_class") or ""

    if (p / "vocab.txt").exists() and ("Bert" in tclass or not (p / "tokenizer.json").exists()):
        lower = tcfg.get("do_lower_case", True)  # BertTokenizer's default when the config does not say
        return "wordpiece", dict(path=p / "vocab.txt", lowercase=lower, strip_accents=tcfg.get("strip_accents"))
    for sp in (p / "tokenizer.model", p / "original" / "tokenizer.model"):
        if sp.exists():
            if _is_tiktoken_file(sp):
                return _load_tiktoken_model(sp, tcfg)
            if sp.parent == p:
                return "sentencepiece", {"path": sp}
    if (p / "tokenizer.json").exists():
        return _load_tokenizer_json(p / "tokenizer.json", tcfg, model_type, template)
    for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (p / vocab_name).exists():
            if not (p / merges_name).exists():
                raise TokenizerError(f"missing file {p / merges_name} (needed with {p / vocab_name})")
            vocab = _read_json(p / vocab_name)
            merges = (p / merges_name).read_text(encoding="utf-8").split("\n")
            return _bpe_from_vocab_merges(p.name, vocab, merges, GPT2_SPLIT, {}, str(p / merges_name), tcfg,
                                          model_type, template, bool(tcfg.get("add_prefix_space", False)))
    raise TokenizerError(f"no tokenizer files in {p}: expected one of tokenizer.json, vocab.json+merges.txt, "
                         "encoder.json+vocab.bpe, tokenizer.model, original/tokenizer.model or vocab.txt "
                         "(a SmolLM2 GGUF file: convert it with `python extras/smol.py`)")
