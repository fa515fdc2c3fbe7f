"""Text handling for PAL: tokenizers (this section) and, later, the persona dialogue datasets.

Every tokenizer here is rebuilt from the model's own files with tiktoken (byte-level BPE), sentencepiece
(Llama 2) or a few lines of Python (BERT WordPiece for GPT-2 Chinese), and tested id for id against the
Hugging Face tokenizer built from the same files (tests/test_tokenizer*.py). transformers is never imported here.
"""
from __future__ import annotations

import base64
import json
import os
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

# ---- Tokenizers ----------------------------------------------------------------------------------------------
#
# One small class per algorithm, one loader that looks at a model directory and picks the right one:
#
#   files in the directory                         -> tokenizer              used by
#   tokenizer.json (BPE, byte-level)               -> BPETokenizer           GPT-2, DialoGPT, SmolLM2, RoBERTa, Llama 3 (HF)
#   vocab.json + merges.txt / encoder.json + vocab.bpe -> BPETokenizer       GPT-2, DialoGPT, RoBERTa
#   tokenizer.model or original/tokenizer.model    -> BPETokenizer           Llama 3 / 3.1 (tiktoken format)
#     in tiktoken format (base64 token + rank)
#   tokenizer.model (sentencepiece protobuf)       -> SentencePieceTokenizer Llama 2
#   vocab.txt (+ config.json/tokenizer_config.json) -> WordPieceTokenizer    GPT-2 Chinese (uer), BERT
#   *.gguf                                         -> BPETokenizer           SmolLM2 GGUF (vocab + merges in metadata)
#
# The rule for every tokenizer: `encode(text)` never turns text into a special token. "<|endoftext|>" typed by a
# user becomes the ids of the characters "<", "|", "endoftext", ...; special ids are only put in by code
# (`chat`, `encode_pair`, `bos=True`, the data collators). That makes prompt injection through data impossible
# and keeps the ids of a dialogue independent of what its text happens to contain.

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
# Split regex named by llama.cpp's `tokenizer.ggml.pre` in a GGUF file.
GGUF_PRE_SPLIT = {"gpt-2": GPT2_SPLIT, "smollm": SMOLLM_SPLIT, "llama-bpe": LLAMA3_SPLIT}


class TokenizerError(ValueError):
    """A tokenizer could not be built or does not fit: the message names the file, key or size at fault."""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used in vocab.json / merges.txt / tokenizer.json.

    Printable latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are shifted to
    chr(256 + k) in byte order, which is why a space shows up as "Ġ" (chr(288)) in GPT-2's files.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, shifted = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _token_bytes(token: str, where: str) -> bytes:
    """A byte-level vocab string ("Ġhello") -> the raw bytes it stands for (b" hello")."""
    inverse = _unicode_to_byte()
    try:
        return bytes(inverse[c] for c in token)
    except KeyError as e:
        raise TokenizerError(f"{where}: token {token!r} has character {e.args[0]!r} outside GPT-2's byte alphabet") from None


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


class Tokenizer:
    """Common interface. Subclasses set the attributes below and implement `encode` / `decode`.

    ids are the model's embedding rows. `specials` maps special-token text to its id (only code inserts them).
    """
    kind = "base"

    def __init__(self, name: str, specials: dict[str, int], vocab_size: int, *, bos: str | None, eos: str | None,
                 pad: str | None, stops: list[str], chat_format: str | None = None, default_system: str | None = None):
        self.name = name
        self.specials = dict(specials)
        self.vocab_size = vocab_size                      # max id + 1: rows the model's embedding must have
        self.bos_id = self._special_id(bos)
        self.eos_id = self._special_id(eos)
        self.pad_id = self._special_id(pad) if pad is not None else self.eos_id
        self.stop_ids = [self._special_id(s) for s in stops]
        self.chat_format = chat_format                    # None, "llama3" or "chatml"
        self.default_system = default_system              # chatml: system prompt added when none is given
        self.has_chat = chat_format is not None

    def _special_id(self, text: str | None) -> int | None:
        if text is None:
            return None
        if text not in self.specials:
            raise TokenizerError(f"{self.name}: special token {text!r} is not in the vocabulary")
        return self.specials[text]

    def token_id(self, special_text: str) -> int:
        """Id of a special token by its text, e.g. tok.token_id("<|eot_id|>")."""
        return self._special_id(special_text)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos:
            ids = [self._require(self.bos_id, "bos")] + ids
        if eos:
            ids = ids + [self._require(self.eos_id, "eos")]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def _require(self, i: int | None, what: str) -> int:
        if i is None:
            raise TokenizerError(f"{self.name}: this tokenizer has no {what} token")
        return i

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}, stops={self.stop_ids}, chat={self.chat_format})")

    # -- chat formats, written out in code (no template engine) --------------------------------------------------
    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation in the model's chat format; message text is encoded as plain text.

        llama3 (Meta's ChatFormat):  <|begin_of_text|> then per message
            <|start_header_id|>{role}<|end_header_id|>"\\n\\n"{content.strip()}<|eot_id|>
            and, for generation, the assistant header.
        chatml (SmolLM2's template): a default system message when the first message is not "system", then per
            message <|im_start|>"{role}\\n{content}"<|im_end|>"\\n", and "<|im_start|>" "assistant\\n" to generate.
        """
        if not self.has_chat:
            raise TokenizerError(f"{self.name}: no chat format (base model tokenizer); use encode()")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"chat: message {k} must be a dict with 'role' and 'content', got {m!r}")
        if self.chat_format == "llama3":
            sh, eh, eot = (self.specials[t] for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
            ids = [self.bos_id]
            for m in messages:
                ids += [sh] + self._encode(m["role"]) + [eh] + self._encode("\n\n")
                ids += self._encode(m["content"].strip()) + [eot]
            if add_generation_prompt:
                ids += [sh] + self._encode("assistant") + [eh] + self._encode("\n\n")
            return ids
        if self.chat_format == "chatml":
            start, end = self.specials["<|im_start|>"], self.specials["<|im_end|>"]
            if self.default_system is not None and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": self.default_system}] + list(messages)
            ids = []
            for m in messages:
                # the template renders role + "\n" + content between the two specials; encode that span whole,
                # as the reference does after cutting the rendered string at special tokens.
                ids += [start] + self._encode(m["role"] + "\n" + m["content"]) + [end] + self._encode("\n")
            if add_generation_prompt:
                ids += [start] + self._encode("assistant\n")
            return ids
        raise TokenizerError(f"{self.name}: unknown chat format {self.chat_format!r}")


def _chars_with_bytes(missing: set[bytes]):
    """A regex matching the characters whose UTF-8 encoding uses one of the `missing` single bytes (True: any)."""
    ranges = []
    for (b,) in missing:
        if b < 0x80:
            ranges.append((b, b))
        elif 0xC2 <= b <= 0xDF:             # lead byte of a 2-byte sequence
            ranges.append(((b & 0x1F) << 6, ((b & 0x1F) << 6) + 0x3F))
        elif 0xE0 <= b <= 0xEF:             # 3-byte sequence
            ranges.append(((b & 0x0F) << 12, ((b & 0x0F) << 12) + 0xFFF))
        elif 0xF0 <= b <= 0xF4:             # 4-byte sequence
            ranges.append(((b & 0x07) << 18, ((b & 0x07) << 18) + 0x3FFFF))
        elif 0x80 <= b <= 0xBF:             # a continuation byte hides in many characters: always check
            return True
        # 0xC0, 0xC1, 0xF5..0xFF never occur in UTF-8 text
    if not ranges:
        return None
    return re.compile("[" + "".join(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in ranges) + "]")


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 family, SmolLM2, RoBERTa, Llama 3) run by tiktoken.

    tiktoken merges, inside each regex piece, the adjacent pair whose concatenation has the lowest *rank*;
    Hugging Face merges the pair that comes first in merges.txt. Giving each merged token the index of the merge
    that creates it as its rank makes the two the same algorithm. The model's ids may be a different numbering
    (RoBERTa's vocab.json follows fairseq's dictionary, SmolLM2 puts 17 specials first): `rank_to_id` maps
    tiktoken's output to them, and is skipped when ranks already are the ids.
    """
    kind = "bpe"

    def __init__(self, name: str, ranks: dict[bytes, int], split: str, id_of_rank: dict[int, int] | None,
                 specials: dict[str, int], *, add_prefix_space: bool = False, **kw):
        import tiktoken
        self.add_prefix_space = add_prefix_space
        ids_of = (lambda r: id_of_rank[r]) if id_of_rank is not None else (lambda r: r)
        dropped = {b for b, r in ranks.items() if ids_of(r) < 0}     # bytes without a token (see _ranks_from_merges)
        n = max(list(specials.values()) + [ids_of(r) for r in ranks.values()]) + 1   # vocab size: max id + 1
        merged = sorted((r, ids_of(r)) for r in ranks.values() if r >= 256)
        if id_of_rank is not None and all(a[1] < b[1] for a, b in zip(merged, merged[1:])):
            # ids already follow merge order (GPT-2: equal; SmolLM2: shifted by its 17 specials), so they can be
            # tiktoken's ranks and no id table is needed. Bytes without a token get ids past the vocabulary.
            phantom = iter(range(n, n + 256))
            ranks = {b: (next(phantom) if b in dropped else id_of_rank[r]) for b, r in ranks.items()}
            id_of_rank, ids_of = None, (lambda r: r)
        # tiktoken's specials table stays empty: we only call encode_ordinary, so no text can become a special.
        self._enc = tiktoken.Encoding(name=f"pal:{name}", pat_str=split, mergeable_ranks=ranks, special_tokens={})
        self._rank_to_id = None
        if id_of_rank is not None:
            table = [-1] * (max(ranks.values()) + 1)  # list indexing is the fastest lookup from Python
            for r, i in id_of_rank.items():
                table[r] = i
            self._rank_to_id = table
        # Only text holding a character made of such bytes needs its out-of-vocabulary ids removed.
        self._drop = _chars_with_bytes(dropped) if dropped else None
        # id -> bytes for decoding (specials decode to their own text, like HF with skip_special_tokens=False).
        self._id_bytes: list[bytes | None] = [None] * n
        for b, r in ranks.items():
            if 0 <= ids_of(r) < n:
                self._id_bytes[ids_of(r)] = b
        for t, i in specials.items():
            self._id_bytes[i] = t.encode("utf-8")
        self._special_set = set(specials.values())
        super().__init__(name, specials, n, **kw)

    def _to_ids(self, text: str, ranks: list[int]) -> list[int]:
        ids = ranks if self._rank_to_id is None else [self._rank_to_id[r] for r in ranks]
        if self._drop is not None and (self._drop is True or self._drop.search(text)):
            ids = [i for i in ids if 0 <= i < self.vocab_size]
        return ids

    def _encode(self, text: str) -> list[int]:
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        return self._to_ids(text, self._enc.encode_ordinary(text))

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """encode() of many texts. tiktoken releases the GIL while it encodes, so a few threads, each looping
        over one contiguous chunk, use several cores (one thread task per text would cost more than it saves)."""
        n = min(num_threads or os.cpu_count() or 1, 8)
        if n == 1 or len(texts) < 512:
            return [self._encode(t) for t in texts]
        from concurrent.futures import ThreadPoolExecutor
        size = -(-len(texts) // n)
        chunks = [texts[k:k + size] for k in range(0, len(texts), size)]
        with ThreadPoolExecutor(n) as pool:
            parts = pool.map(lambda chunk: [self._encode(t) for t in chunk], chunks)
        return [ids for part in parts for ids in part]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        parts = []
        for i in ids:
            if i < 0 or i >= self.vocab_size or self._id_bytes[i] is None:
                raise TokenizerError(f"{self.name}: id {i} is not a token (vocab_size {self.vocab_size})")
            if skip_special and i in self._special_set:
                continue
            parts.append(self._id_bytes[i])
        # (with add_prefix_space the added space stays, as in HF's byte-level decoder)
        return b"".join(parts).decode("utf-8", errors="replace")

    def encode_pair(self, a: str, b: str) -> list[int]:
        """RoBERTa sentence pair: <s> a </s></s> b </s> (what the NLI classifier was trained on)."""
        cls, sep = self._special_id("<s>"), self._special_id("</s>")
        return [cls] + self._encode(a) + [sep, sep] + self._encode(b) + [sep]


def _ranks_from_merges(vocab: dict[str, int], merges: list[tuple[str, str]], where: str):
    """GPT-2 style vocab (token string -> id) + ordered merges -> (tiktoken ranks, rank -> id).

    Single bytes get ranks 0..255 (their rank is never compared: tiktoken only ranks pairs), the token made by
    merge k gets rank 256 + k. A vocab token no merge can make is left out: HF's BPE can never produce it either.
    """
    ranks: dict[bytes, int] = {}
    id_of_rank: dict[int, int] = {}
    for b, ch in byte_to_unicode().items():
        # tiktoken needs every single byte; a byte the vocab lacks (SmolLM2 has no \x04, no 0xF5..0xFF, ...) gets
        # the id -1 and is dropped from the output, as HF's BPE drops a character it has no token for.
        ranks[bytes([b])] = b
        id_of_rank[b] = vocab.get(ch, -1)
    for k, (left, right) in enumerate(merges):
        token = left + right
        if token not in vocab:
            raise TokenizerError(f"{where}: merge {k} ({left!r} {right!r}) makes {token!r}, not in the vocabulary")
        tb = _token_bytes(token, where)
        if tb in ranks:  # a second merge making the same token: tiktoken ranks tokens, so the first rank stays
            continue
        ranks[tb] = 256 + k
        id_of_rank[256 + k] = vocab[token]
    return ranks, id_of_rank


def _parse_merges(lines, where: str) -> list[tuple[str, str]]:
    merges = []
    for n, m in enumerate(lines):
        if isinstance(m, str):
            if m.startswith("#version") or not m.strip():
                continue
            parts = m.rstrip("\n").split(" ")
        else:
            parts = list(m)
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _token_text(v) -> str | None:
    """tokenizer_config.json may store a special as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v


def _chat_settings(specials: dict[str, int], template: str | None) -> dict:
    """Pick the chat format from the special tokens; SmolLM2's default system prompt comes from its template."""
    if "<|start_header_id|>" in specials and "<|eot_id|>" in specials:
        return {"chat_format": "llama3"}
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        system = None
        if template:
            # the template's jinja string literal holds the newline either raw or as the two characters "\n"
            m = re.search(r"'<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>(?:\n|\\n)'", template, re.S)
            if m:
                system = m.group(1)
        return {"chat_format": "chatml", "default_system": system}
    return {}


def _bpe_roles(name: str, specials: dict[str, int], cfg: dict, model_type: str | None) -> dict:
    """bos / eos / pad / stop tokens of a byte-level BPE tokenizer, from tokenizer_config.json or the family default."""
    bos, eos, pad = (_token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    if model_type == "roberta" or "<s>" in specials and "</s>" in specials and "<|endoftext|>" not in specials:
        bos, eos, pad = bos or "<s>", eos or "</s>", pad or "<pad>"
    elif "<|begin_of_text|>" in specials:                        # Llama 3
        bos, eos = bos or "<|begin_of_text|>", eos or "<|end_of_text|>"
        pad = pad if pad in specials else "<|finetune_right_pad_id|>" if "<|finetune_right_pad_id|>" in specials else eos
    elif "<|im_start|>" in specials:                             # SmolLM2: eos is <|im_end|>, pad = eos
        eos = eos or "<|im_end|>"
        bos = bos or "<|im_start|>"
    else:                                                        # GPT-2 / DialoGPT: <|endoftext|> everywhere
        eos = eos or "<|endoftext|>"
        bos = bos or eos
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
                           add_prefix_space: bool = False) -> BPETokenizer:
    ranks, id_of_rank = _ranks_from_merges(vocab, _parse_merges(merges, where), where)
    # keep the specials the vocab file lists (RoBERTa's <s>, GPT-2's <|endoftext|>) even when no added_tokens say so
    for t in ("<|endoftext|>", "<s>", "</s>", "<pad>", "<unk>", "<mask>"):
        if t in vocab and t not in specials:
            specials[t] = vocab[t]
    return BPETokenizer(name, ranks, split, id_of_rank, specials, add_prefix_space=add_prefix_space,
                        **_bpe_roles(name, specials, cfg, model_type), **_chat_settings(specials, template))


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


def _load_tiktoken_model(path: Path, cfg: dict) -> BPETokenizer:
    """Llama 3 tokenizer.model: lines "base64(token) rank"; the 256 specials follow the last rank."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except Exception:
                raise TokenizerError(f"{path}: line {n} is not 'base64-token rank'") from None
    specials = {t: len(ranks) + k for k, t in enumerate(LLAMA3_SPECIALS)}
    roles = _bpe_roles(path.name, specials, cfg, "llama")
    return BPETokenizer(path.parent.name, ranks, LLAMA3_SPLIT, None, specials, **roles, chat_format="llama3")


def read_gguf_metadata(path: Path) -> dict:
    """The key/value header of a GGUF file (format v2/v3, little-endian), without touching the tensors.

    Layout: b"GGUF", u32 version, u64 tensor count, u64 kv count, then per kv: string key, u32 type, value.
    A string is u64 length + utf-8 bytes; an array is u32 item type + u64 count + items. (gguf.GGUFReader also
    indexes every tensor, ~15 s for SmolLM2 on a busy machine; the tokenizer needs only this header.)
    """
    import struct
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise TokenizerError(f"{path}: not a GGUF file (bad magic)")
        version, _, n_kv = struct.unpack("<IQQ", f.read(20))
        if version not in (2, 3):
            raise TokenizerError(f"{path}: GGUF version {version} not supported (2 or 3)")

        def string():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", errors="replace")

        def value(t):
            if t == 8:
                return string()
            if t == 9:
                item_t, count = struct.unpack("<IQ", f.read(12))
                if item_t in scalar:   # numeric arrays in one read
                    fmt = scalar[item_t]
                    return list(struct.unpack(f"<{count}{fmt[1]}", f.read(count * struct.calcsize(fmt))))
                return [value(item_t) for _ in range(count)]
            if t not in scalar:
                raise TokenizerError(f"{path}: unknown GGUF value type {t}")
            fmt = scalar[t]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        meta = {}
        for _ in range(n_kv):
            key = string()
            (t,) = struct.unpack("<I", f.read(4))
            meta[key] = value(t)
    return meta


def _load_gguf(path: Path) -> BPETokenizer:
    """The tokenizer stored in a GGUF file's metadata (vocab, merges, llama.cpp pre-tokenizer name)."""
    meta = read_gguf_metadata(path)

    def get(key, default=KeyError):
        if key not in meta:
            if default is KeyError:
                raise TokenizerError(f"{path}: GGUF metadata key {key!r} missing")
            return default
        return meta[key]

    if get("tokenizer.ggml.model") != "gpt2":
        raise TokenizerError(f"{path}: GGUF tokenizer model {get('tokenizer.ggml.model')!r} is not byte-level BPE")
    pre = get("tokenizer.ggml.pre", "gpt-2")
    if pre not in GGUF_PRE_SPLIT:
        raise TokenizerError(f"{path}: GGUF pre-tokenizer {pre!r} unknown (known: {sorted(GGUF_PRE_SPLIT)})")
    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    # token_type 3 = control (special), 4 = user-defined; both are matched only as whole special tokens.
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}
    vocab = {t: i for i, t in enumerate(tokens) if t not in specials}
    names = {k: tokens[get(f"tokenizer.ggml.{k}_token_id")] for k in ("bos", "eos", "padding")
             if f"tokenizer.ggml.{k}_token_id" in meta}
    cfg = {"bos_token": names.get("bos"), "eos_token": names.get("eos"), "pad_token": names.get("padding")}
    return _bpe_from_vocab_merges(path.stem, vocab, get("tokenizer.ggml.merges"), GGUF_PRE_SPLIT[pre], specials,
                                  str(path), cfg, None, get("tokenizer.chat_template", None))


class SentencePieceTokenizer(Tokenizer):
    """Llama 2: the sentencepiece model itself (Meta's reference), ids straight from the .model file.

    sentencepiece adds the dummy-prefix "▁" to every encoded text and never matches "<s>" written in text.
    Hugging Face's LlamaTokenizer (legacy=False) agrees on ordinary text; it differs on a leading space and on
    runs of spaces before a word, where we follow sentencepiece (tests/test_tokenizer.py lists the cases).
    """
    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        specials = {pieces[i]: i for i in range(len(pieces)) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        bos, eos = pieces[self.sp.bos_id()], pieces[self.sp.eos_id()]
        pad = pieces[self.sp.pad_id()] if self.sp.pad_id() >= 0 else None
        super().__init__(path.parent.name, specials, len(pieces), bos=bos, eos=eos, pad=pad, stops=[eos])

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=min(num_threads or os.cpu_count() or 1, 8))

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if not skip_special:  # sentencepiece drops control pieces; show them like HF does
            out, run = [], []
            for i in ids:
                if i in self._special_ids:
                    out.append(self.sp.decode(run))
                    out.append(self.sp.id_to_piece(i))
                    run = []
                else:
                    run.append(i)
            out.append(self.sp.decode(run))
            return "".join(out)
        return self.sp.decode(list(ids))

    @property
    def _special_ids(self) -> set[int]:
        return set(self.specials.values())


# BERT's "Chinese character" blocks: CJK ideographs only (not Hiragana/Katakana/Hangul, which BERT treats as letters).
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_bert_punct(ch: str) -> bool:
    cp = ord(ch)  # every non-alphanumeric ASCII symbol counts, even "$" or "^" which Unicode calls symbols
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or unicodedata.category(ch).startswith("P")


@lru_cache(maxsize=65536)
def _bert_char_kind(ch: str) -> str:
    """How BERT's basic tokenizer treats one character: drop, space, cjk, punct or other."""
    cp = ord(ch)
    cat = unicodedata.category(ch)
    if ch in "\t\n\r" or (not cat.startswith("C") and ch.isspace()):
        return "space"
    if cp == 0 or cp == 0xFFFD or cat.startswith("C"):
        return "drop"
    if _is_cjk(cp):
        return "cjk"
    if _is_bert_punct(ch):
        return "punct"
    return "other"


_ASCII_CONTROL = {c: None for c in list(range(32)) + [127] if chr(c) not in "\t\n\r"}
_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece (GPT-2 Chinese uses BERT's vocab.txt): basic tokenization, then greedy longest match.

    Basic tokenization: drop NUL / U+FFFD / control characters, map whitespace to " ", put spaces around every
    CJK ideograph (so each is its own word), lower-case and strip accents if the config says so, then split on
    whitespace and punctuation. WordPiece: longest vocab prefix, continuations prefixed "##"; a word that cannot be
    covered (or is longer than 100 characters) becomes [UNK] as a whole.
    """
    kind = "wordpiece"

    def __init__(self, path: Path, lowercase: bool = True, strip_accents: bool | None = None):
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        self.vocab = {}
        for i, t in enumerate(lines):
            self.vocab.setdefault(t.rstrip("\r"), i)
        self.inv = {i: t for t, i in self.vocab.items()}
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        specials = {t: self.vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in self.vocab}
        for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"):
            if t not in specials:
                raise TokenizerError(f"{path}: WordPiece vocab has no {t} line")
        self.unk = specials["[UNK]"]
        # uer/gpt2-chinese: a text is "[CLS] ... [SEP]"; generation stops at [SEP].
        super().__init__(path.parent.name, specials, len(lines), bos="[CLS]", eos="[SEP]", pad="[PAD]",
                         stops=["[SEP]"])
        self._cache: dict[str, list[int]] = {}

    def _normalize(self, text: str) -> str:
        out = []
        for ch in text:
            kind = _bert_char_kind(ch)
            if kind == "space":
                out.append(" ")
            elif kind == "cjk":
                out.append(f" {ch} ")
            elif kind != "drop":
                out.append(ch)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.lowercase:
            text = text.lower()
        return text

    def _words(self, text: str) -> list[str]:
        if text.isascii():
            # the same steps on ASCII text, in C: drop control characters, lower-case, then each run of letters
            # and digits is a word and every other visible character (all ASCII symbols are BERT punctuation) too.
            text = text.translate(_ASCII_CONTROL)
            return _ASCII_WORDS.findall(text.lower() if self.lowercase else text)
        words = []
        for chunk in self._normalize(text).split():
            cur = []
            for ch in chunk:
                if _bert_char_kind(ch) == "punct":
                    if cur:
                        words.append("".join(cur))
                        cur = []
                    words.append(ch)
                else:
                    cur.append(ch)
            if cur:
                words.append("".join(cur))
        return words

    def _wordpiece(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        ids = []
        if len(word) > 100:
            ids = [self.unk]
        else:
            start = 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        ids.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:   # no prefix of the rest is in the vocab: the whole word is unknown
                    ids = [self.unk]
                    break
                start = end
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _encode(self, text: str) -> list[int]:
        ids = []
        for w in self._words(text):
            ids += self._wordpiece(w)
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Like HF's WordPiece decoder: tokens joined by spaces, "##" continuations glued to the previous one, and
        the space before "." "," "?" "!" removed (its clean-up runs per token, so "i ' m" stays as it is)."""
        out = []
        special = set(self.specials.values())
        for i in ids:
            if i not in self.inv:
                raise TokenizerError(f"{self.name}: id {i} is not a token (vocab_size {self.vocab_size})")
            if skip_special and i in special:
                continue
            t = self.inv[i]
            if out and t.startswith("##"):
                t = t[2:]
            elif out:
                t = " " + t
            if t in (" .", " ,", " ?", " !"):
                t = t[1:]
            out.append(t)
        return "".join(out)

    def encode_pair(self, a: str, b: str) -> list[int]:
        """BERT pair framing: [CLS] a [SEP] b [SEP]."""
        cls, sep = self.specials["[CLS]"], self.specials["[SEP]"]
        return [cls] + self._encode(a) + [sep] + self._encode(b) + [sep]


def _is_tiktoken_file(path: Path) -> bool:
    """Llama 3's tokenizer.model is text ("base64 rank" lines); sentencepiece's is a binary protobuf."""
    with open(path, "rb") as f:
        head = f.read(256)
    return bool(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\n?", head.split(b"\n")[0] + b"\n"))


def _resolve_dir(name_or_path: str | Path) -> Path:
    """Local path as is; anything else through model.resolve_model_dir (hub id, "smol")."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    try:
        from model import resolve_model_dir
    except ImportError:
        raise TokenizerError(f"unknown tokenizer {str(name_or_path)!r}: not a local path, and model.py "
                             "(which resolves hub ids and 'smol') is not importable") from None
    return Path(resolve_model_dir(name_or_path))


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """Build the tokenizer of a model directory (or of one tokenizer file / GGUF), choosing by the files present."""
    p = _resolve_dir(name_or_path)
    if p.is_file():
        if p.suffix == ".gguf":
            return _load_gguf(p)
        if p.name == "tokenizer.json":
            return _load_tokenizer_json(p, {}, None, None)
        if p.suffix == ".model":
            return _load_tiktoken_model(p, {}) if _is_tiktoken_file(p) else SentencePieceTokenizer(p)
        raise TokenizerError(f"{p}: not a tokenizer file (expected tokenizer.json, *.model or *.gguf)")
    config = _read_json(p / "config.json") if (p / "config.json").exists() else {}
    tcfg = _read_json(p / "tokenizer_config.json") if (p / "tokenizer_config.json").exists() else {}
    model_type = config.get("model_type")
    template = tcfg.get("chat_template")
    if template is None and (p / "chat_template.jinja").exists():
        template = (p / "chat_template.jinja").read_text(encoding="utf-8")
    tclass = tcfg.get("tokenizer_class") or config.get("tokenizer_class") or ""

    if (p / "vocab.txt").exists() and ("Bert" in tclass or not (p / "tokenizer.json").exists()):
        lower = tcfg.get("do_lower_case", True)  # BertTokenizer's default when the config does not say
        return WordPieceTokenizer(p / "vocab.txt", lowercase=lower, strip_accents=tcfg.get("strip_accents"))
    for sp in (p / "tokenizer.model", p / "original" / "tokenizer.model"):
        if sp.exists():
            if _is_tiktoken_file(sp):
                return _load_tiktoken_model(sp, tcfg)
            if sp.parent == p:
                return SentencePieceTokenizer(sp)
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
    ggufs = sorted(p.glob("*.gguf"))
    if ggufs:
        return _load_gguf(ggufs[0])
    raise TokenizerError(f"no tokenizer files in {p}: expected one of tokenizer.json, vocab.json+merges.txt, "
                         "encoder.json+vocab.bpe, tokenizer.model, original/tokenizer.model, vocab.txt or *.gguf")


def check_tokenizer_fits(tok: Tokenizer, model_or_vocab_size) -> None:
    """Raise if some id the tokenizer can produce has no row in the model's embedding (ids would index past it)."""
    if isinstance(model_or_vocab_size, int):
        n = model_or_vocab_size
    else:
        cfg = getattr(model_or_vocab_size, "config", None)
        n = getattr(cfg, "vocab_size", None)
        if n is None:
            raise TokenizerError(f"cannot read vocab_size from {type(model_or_vocab_size).__name__}.config")
    if tok.vocab_size > n:
        raise TokenizerError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's embedding has only "
                             f"{n} rows: this tokenizer does not belong to this model")


# TEMP (lead): dataset section lives in persona_data.py until the merge
_lt = load_tokenizer
from persona_data import *  # noqa
load_tokenizer = _lt
