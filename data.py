"""Text for PAL. Part 1: persona dialogues -> training batches. Part 2: tokenizers, text <-> token ids.

    files ──parse──> Dialogue(personas, turns) ──make_examples──> Example(personas, history, response, label)
          ──splits──> {"train", "valid1", "valid2", "test"} ──prompts──> (prompt text, target text)
          ──encode──> feature {"input_ids", "labels"} (python lists) ──collate──> batch of LongTensors (B, T)

Bad input never disappears silently: a line that cannot be parsed raises DataFormatError naming file, line
number and line (a file without any dialogue: the file); irregularities with a documented rule are counted in the
parsers' ParseStats (`.stats`, printed by `.report()`).
`python extras/data_stats.py --data-dir DIR` prints the paper's Table 1 and the persona-label distribution.
"""
from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from itertools import accumulate
from pathlib import Path
from typing import Callable, Iterable, Sequence

import sentencepiece as spm
import tiktoken
import torch
from tqdm import tqdm

from infra.datafiles import MAX_TEXT_CHARS, DataFormatError, ParseStats, capped, read_lines  # noqa: F401
from infra.tokfiles import TokenizerError, byte_to_unicode, read_tokenizer  # noqa: F401 (byte_to_unicode: gpu_check.sh)

IGNORE = -100  # THE label value that is not a target (prompt, padding); dpo.py imports it from here

# ==============================================================================================================
# Part 1. Persona dialogue datasets -> examples -> prompts -> batches
# ==============================================================================================================

# BERT's "Chinese character" blocks: CJK ideographs only (not Hiragana/Katakana/Hangul, which BERT treats as
# letters). CJK_CHAR is THE CJK test of the project: WordPiece, content_words, detect_lang, pal.py's metrics.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
CJK_CHAR = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _CJK_RANGES) + "]")  # one CJK ideograph


# ----------------------------------------------------------------------------------------------------
# Records


@dataclass
class Turn:
    """One exchange seen from our speaker: the partner's message, then our speaker's response.

    partner is None when our speaker opens the dialogue (ParlAI writes `__SILENCE__`). response is None when
    the file holds a partner message without an answer (kept as history, no example is made from it)."""
    partner: str | None
    response: str | None
    candidates: list[str] | None = None  # ConvAI2: 20 candidates, the gold response is among them
    gold_label: int | None = None        # persona label given by the file itself (Baidu), if any
    has_gold_label: bool = False         # distinguishes "file says: no persona" from "file says nothing"
    source: str = ""                     # "file:line", for error messages


@dataclass
class Dialogue:
    personas: list[str]                  # our speaker's persona sentences
    turns: list[Turn]
    dialogue_id: int                     # unit of every split: both speakers of one conversation share it
    partner_personas: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)  # utterances before the first turn (JSON lines that
    source: str = ""                                   # start mid-conversation); empty for ParlAI files


@dataclass
class Example:
    personas: list[str]
    history: list[str]                   # every earlier utterance, oldest first; the last is the partner's
    response: str
    persona_label: int | None            # index into personas of the sentence the response draws on
    dialogue_id: int
    candidates: list[str] | None = None


class Dialogues(list):
    """A list of Dialogue that also carries the ParseStats of the files it came from (`.stats`)."""
    stats: ParseStats


SILENCE = "__SILENCE__"


def _checked(dialogues: Dialogues, path: Path) -> Dialogues:
    """The parsers' last step: a file without a single dialogue is an error, not an empty split."""
    if not dialogues:
        raise DataFormatError(path, None, "", f"no dialogues in its {dialogues.stats.lines} lines (empty file?)")
    return dialogues


# ----------------------------------------------------------------------------------------------------
# ParlAI "self" format (PERSONA-CHAT, ConvAI2)

_NUMBERED = re.compile(r"^(\d+) (.*)$", re.S)
_PERSONA_PREFIXES = (("your persona:", "self"), ("partner's persona:", "partner"))


def read_personachat(path, strict_utf8: bool = False, first_id: int = 0) -> Dialogues:
    """Parse a ParlAI self/both/none text file into dialogues.

    Lines: `N your persona: ...` (`N partner's persona: ...` in "both" files), then turns
    `N context\\tresponse[\\treward\\tcand1|cand2|...]`; a context `__SILENCE__` means our speaker opens.
    A new dialogue starts when N does not grow (ParlAI's rule; a restart at N != 1 and a skipped N are counted).
    A persona line after the first turn, an unnumbered line, > 4 tab fields or a file without any dialogue
    raise DataFormatError."""
    path = Path(path)
    stats = ParseStats(files=[str(path)])
    dialogues = Dialogues()
    cur: Dialogue | None = None
    last_num = 0

    def close(d: Dialogue | None):
        if d is None:
            return
        if not any(t.response is not None for t in d.turns):
            stats.count("empty_dialogues", f"{d.source}: dialogue without any response skipped")
            return
        if not d.personas:  # kept: its prompts show "-" for the persona list and select answers "0"
            stats.count("no_persona_dialogues", f"{d.source}: dialogue without persona lines")
        d.dialogue_id = first_id + len(dialogues)
        dialogues.append(d)

    for lineno, line in read_lines(path, stats, strict_utf8):
        if not line.strip():
            stats.blank_lines += 1
            continue
        m = _NUMBERED.match(line)
        if m is None:
            raise DataFormatError(path, lineno, line, "expected a line starting with its number and a space")
        num, body = int(m.group(1)), m.group(2)
        if cur is None or num <= last_num:  # the numbering went back: a new dialogue begins
            if num != 1:
                stats.count("numbering_restarts", f"{path}:{lineno}: new dialogue starts at number {num}, not 1")
            close(cur)
            cur = Dialogue(personas=[], turns=[], dialogue_id=-1, source=f"{path}:{lineno}")
        elif num != last_num + 1:
            stats.count("numbering_gaps", f"{path}:{lineno}: line number jumps from {last_num} to {num}")
        last_num = num

        kind = next((k for p, k in _PERSONA_PREFIXES if body.startswith(p)), None)
        if kind is not None:
            if cur.turns:
                raise DataFormatError(path, lineno, line, "persona line after the dialogue's first turn")
            text = capped(body.split(":", 1)[1].strip(), stats, f"{path}:{lineno}")
            (cur.personas if kind == "self" else cur.partner_personas).append(text)
            continue

        fields = body.split("\t")
        if len(fields) > 4:
            raise DataFormatError(path, lineno, line, f"{len(fields)} tab-separated fields, at most 4 expected")
        context = capped(fields[0].strip(), stats, f"{path}:{lineno}")
        response = capped(fields[1].strip(), stats, f"{path}:{lineno}") if len(fields) > 1 else ""
        candidates = None
        if len(fields) == 4 and fields[3].strip():
            candidates = [c.strip() for c in fields[3].split("|")]
        partner: str | None = context
        if context == SILENCE or context == "":
            partner = None
            if context == SILENCE:
                stats.silence_openers += 1
            if cur.turns:  # silence in the middle of a dialogue: nothing was said, keep it as no message
                stats.count(None, f"{path}:{lineno}: empty/silent context in the middle of a dialogue")
        if not response:
            stats.count("missing_responses", f"{path}:{lineno}: turn without a response (kept as history only)")
        cur.turns.append(Turn(partner, response or None, candidates if response else None, source=f"{path}:{lineno}"))
    close(cur)
    stats.dialogues = len(dialogues)
    stats.examples = sum(t.response is not None for d in dialogues for t in d.turns)
    dialogues.stats = stats
    return _checked(dialogues, path)


# ----------------------------------------------------------------------------------------------------
# Baidu-Persona-Chat JSON lines (one example per line) -> dialogues


def _flatten(d: Dialogue) -> list[str]:
    """Every utterance of the dialogue so far (context, then partner/response per turn), oldest first."""
    return list(d.context) + [u for t in d.turns for u in (t.partner, t.response) if u is not None]


def _rows_to_dialogues(rows: list[tuple[list[str], list[str], Turn]], stats: ParseStats,
                       first_id: int = 0) -> Dialogues:
    """Group rows (personas, history, turn answering history[-1]) into per-speaker dialogues.

    A row continues the conversation (same dialogue_id) when its history extends the previous row's history
    + response. Inside it, rows with the same personas are one speaker, whose next row must extend their
    dialogue by one partner message, else a new dialogue of the conversation opens (a conversation break)."""
    dialogues = Dialogues()
    conv_id = first_id - 1
    open_by_speaker: dict[tuple, Dialogue] = {}
    prev_history, prev_response = None, None
    for personas, history, turn in rows:
        if not (prev_history is not None and len(history) > len(prev_history)
                and history[: len(prev_history) + 1] == prev_history + [prev_response]):
            conv_id += 1
            open_by_speaker = {}
        prev_history, prev_response = history, turn.response
        d = open_by_speaker.get(tuple(personas))
        if d is None or _flatten(d) + [turn.partner] != history:
            if d is not None:
                stats.count("conversation_breaks",
                            f"{turn.source}: history does not extend this speaker's earlier turns; new dialogue")
            d = Dialogue(list(personas), [], conv_id, context=list(history[:-1]), source=turn.source)
            if not personas:
                stats.count("no_persona_dialogues", f"{turn.source}: dialogue without persona lines")
            open_by_speaker[tuple(personas)] = d
            dialogues.append(d)
        d.turns.append(turn)
    stats.dialogues = len({d.dialogue_id for d in dialogues})
    stats.examples = len(rows)
    dialogues.stats = stats
    return dialogues


def _parse_label(value, n_personas: int, where: tuple) -> int | None:
    """Baidu labels: an index, a list of indices (the authors' layout: [2], [0, 2]; the first one is the label,
    as their code takes label[0]), a 0/1 vector over the personas, or -1/[-1]/[]/null (no persona).
    where = (path, lineno, line) of the label, for the DataFormatError of a label that cannot be read."""
    if value is None or value == [] or value == -1 or value == [-1]:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    ints = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if ints and len(value) == n_personas and n_personas > 1 and set(value) <= {0, 1}:
        return value.index(1) if 1 in value else None  # one-hot / multi-hot: the first persona used
    if ints:  # indices: each must name a persona, the first is the label
        for v in value:
            if not 0 <= v < n_personas:
                raise DataFormatError(*where, f"label {v} outside 0..{n_personas - 1}")
        return value[0]
    raise DataFormatError(*where, f"cannot read persona label {value!r}")


def split_sentences(text: str) -> list[str]:
    """Split a run of persona sentences after each 。！？!? (Chinese or English), keeping the end mark."""
    parts = re.findall(r"[^。！？!?]+[。！？!?]?", text.strip())
    return [p.strip() for p in parts if p.strip()]


def _baidu_records(path: Path, stats: ParseStats, strict_utf8: bool) -> list[tuple[int | str, str, object]]:
    """(line number or "row i", its text, its JSON value) for each row of a Baidu file: one JSON array per line,
    or the whole file one JSON array of rows (the PAL authors' train_ch.txt layout: a list whose items are all
    lists; a JSON-lines file with one row holds a response string, so it is never taken for this)."""
    lines = read_lines(path, stats, strict_utf8)
    try:
        whole = json.loads("\n".join(line for _, line in lines))
    except json.JSONDecodeError:
        whole = None  # several values, one per line: JSON lines
    if isinstance(whole, list) and all(isinstance(row, list) for row in whole):
        return [(f"row {i}", json.dumps(row, ensure_ascii=False), row) for i, row in enumerate(whole)]
    records = []
    for lineno, line in lines:
        if not line.strip():
            stats.blank_lines += 1
            continue
        try:
            records.append((lineno, line, json.loads(line)))
        except json.JSONDecodeError as e:  # re-raised naming file:line
            raise DataFormatError(path, lineno, line, f"not JSON ({e.msg})") from None
    return records


def read_baidu_jsonl(path, strict_utf8: bool = False, first_id: int = 0) -> Dialogues:
    """Baidu-Persona-Chat: rows `[personas, history, response]` + optional `label`, one JSON array per line, or
    all in one JSON array (_baidu_records).

    personas is a list of sentences (a single string is split at sentence ends), history a list of
    utterances oldest first, response a string. The file's label, when given, becomes the example's gold
    persona label (see _parse_label); without it the persona labeler decides. A file without any example
    raises DataFormatError."""
    path = Path(path)
    stats = ParseStats(files=[str(path)])
    rows = []
    for lineno, line, obj in _baidu_records(path, stats, strict_utf8):
        if not isinstance(obj, list) or len(obj) not in (3, 4):
            raise DataFormatError(path, lineno, line, "expected [personas, history, response(, label)]")
        personas, history, response = obj[0], obj[1], obj[2]
        if isinstance(personas, str):
            personas = split_sentences(personas)
        for name, value in (("personas", personas), ("history", history)):
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise DataFormatError(path, lineno, line, f"{name} must be a list of strings")
        if not isinstance(response, str):
            raise DataFormatError(path, lineno, line, "response must be a string")
        if not response.strip():
            stats.count("missing_responses", f"{path}:{lineno}: empty response, line skipped (no example)")
            continue
        label = _parse_label(obj[3], len(personas), (path, lineno, line)) if len(obj) == 4 else None
        where = f"{path}:{lineno}"
        personas = [capped(p.strip(), stats, where) for p in personas]
        history = [capped(h.strip(), stats, where) for h in history]
        turn = Turn(history[-1] if history else None, capped(response.strip(), stats, where), None, label,
                    len(obj) == 4, where)
        rows.append((personas, history, turn))
    return _checked(_rows_to_dialogues(rows, stats, first_id), path)


def file_format(path) -> str:
    """ "baidu" for `.jsonl`/`.json` or a file whose text starts with "[" (JSON lines or one JSON array), else
    "personachat" (ParlAI text)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    return "baidu" if path.suffix in (".jsonl", ".json") or head.lstrip().startswith(b"[") else "personachat"


def read_dialogues(path, **kw) -> Dialogues:
    """Pick the parser from file_format: Baidu JSON (lines or one array), otherwise ParlAI text."""
    path = Path(path)
    if file_format(path) == "baidu":
        return read_baidu_jsonl(path, **kw)
    return read_personachat(path, **kw)


# ----------------------------------------------------------------------------------------------------
# Dialogues -> examples


def make_examples(dialogues: Iterable[Dialogue], labeler: str | Callable | None = "lexical") -> list[Example]:
    """One Example per response. History = the dialogue's earlier utterances, oldest first, ending with the
    partner message being answered (absent when our speaker opens, i.e. after `__SILENCE__`).

    labeler: "lexical" (lexical_persona_label), None (no labels), or a callable(personas, response) -> int|None.
    A label written in the file itself (Baidu) wins over the labeler."""
    if labeler == "lexical":
        labeler = lexical_persona_label
    elif isinstance(labeler, str):
        raise ValueError(f"unknown labeler {labeler!r} (use 'lexical', None or a callable)")
    examples = []
    for d in dialogues:
        history = list(d.context)
        for t in d.turns:
            history += [t.partner] if t.partner is not None else []
            if t.response is not None:
                label = t.gold_label if t.has_gold_label else labeler(d.personas, t.response) if labeler else None
                examples.append(Example(list(d.personas), list(history), t.response, label, d.dialogue_id,
                                        list(t.candidates) if t.candidates is not None else None))
                history.append(t.response)
    return examples


# ----------------------------------------------------------------------------------------------------
# Persona labels
#
# Lexical method (default, deterministic): each persona sentence and the response become sets of content
# words: lower-cased alphanumeric words (apostrophes split words: "i've" -> "i", "ve"), stop words removed
# (function words, and the generic verbs persona sentences are made of: like, love, have, enjoy...), each
# word lightly stemmed by dropping one suffix of ing/ed/es/s/e when at least 3 letters remain
# ("bakes", "baked", "baking", "bake" -> "bak"; "books" -> "book"). Chinese text (no spaces) uses the
# characters of CJK runs that are not stop characters (我, 的, 喜欢...), plus the bigrams of two such adjacent
# characters. The persona with the largest overlap wins if the overlap has at least `min_overlap` items and
# covers at least `min_ratio` of that persona's content words; ties go to the higher ratio, then to the lower
# index. Otherwise the label is None (no persona used). (NLI labels: nli.nli_persona_labels, then relabel.)

_STOP_EN = set("""
a about above after again against all also am an and any are aren as at be because been before being below
between both but by can cannot could couldn did didn do does doesn doing don down during each few for from
further had hadn has hasn have haven having he her here hers herself him himself his how i if in into is isn
it its itself just let ll m me more most my myself no nor not now of off on once only or other our ours
ourselves out over own re s same she should so some such t than that the their theirs them themselves then
there these they this those through to too under until up ve very was wasn we were weren what when where which
while who whom why will with won would wouldn you your yours yourself yourselves d y o
like likes liked love loves loved enjoy enjoys really well get got go going gone make made want wants
one thing things lot lots much many time yes yeah oh ok okay hi hello hey lol um wow nice cool good great
know think im dont favorite also just still always never ever sure maybe
""".split())
_STOP_ZH = set("我你他她它的了是在有和也都就不很吗呢吧啊呀哦嗯么这那个们一人会要说好没还喜欢最")
_SUFFIXES = ("ing", "ed", "es", "s", "e")
_CJK_RUN = re.compile(CJK_CHAR.pattern + "+")


def _stem(w: str) -> str:
    for s in _SUFFIXES:
        if w.endswith(s) and len(w) - len(s) >= 3:
            return w[: -len(s)]
    return w


def content_word_sequence(text: str) -> list[str]:
    """The content words of `text` in reading order, repeats kept (pal.py's verbatim-copy test compares
    orders): stemmed non-stop English words and non-stop CJK characters, as content_words counts them."""
    text = text.lower()
    words = re.findall(r"[a-z0-9]+|" + CJK_CHAR.pattern, text)
    return [_stem(w) for w in words if w not in _STOP_EN and w not in _STOP_ZH]


def content_words(text: str) -> set[str]:
    """THE content-word rule (see the comment above): the items the lexical labeler compares, and the ones
    pal.py's persona coverage counts. English: stemmed non-stop words; Chinese: characters and bigrams."""
    items = set(content_word_sequence(text))  # the words and the single CJK characters
    for run in _CJK_RUN.findall(text.lower()):
        kept = [c if c not in _STOP_ZH else None for c in run]  # stop characters break the run
        items.update(a + b for a, b in zip(kept, kept[1:]) if a is not None and b is not None)
    return items


def lexical_persona_label(personas: Sequence[str], response: str, min_overlap: int = 1,
                          min_ratio: float = 0.2) -> int | None:
    """Index of the persona sentence the response draws on, or None (see the method's comment above)."""
    resp = content_words(response)
    candidates = []  # (overlap, ratio, -index): the largest wins, so ties go to the higher ratio, then lower index
    for i, p in enumerate(personas):
        words = content_words(p)
        overlap = len(words & resp)
        if words and overlap >= min_overlap and overlap / len(words) >= min_ratio:
            candidates.append((overlap, overlap / len(words), -i))
    return -max(candidates)[2] if candidates else None


def relabel(examples: Sequence[Example], labels: Sequence[int | None]) -> list[Example]:
    """Copies of the examples with new persona labels."""
    if len(labels) != len(examples):
        raise ValueError(f"{len(labels)} labels for {len(examples)} examples")
    return [Example(e.personas, e.history, e.response, l, e.dialogue_id, e.candidates)
            for e, l in zip(examples, labels)]


def label_distribution(examples: Sequence[Example]) -> dict:
    """{"labelled": n, "total": N, "by_index": {0: .., 1: .., ..., None: ..}}"""
    by_index = Counter(e.persona_label for e in examples)
    order = sorted(k for k in by_index if k is not None) + ([None] if None in by_index else [])
    return {"labelled": len(examples) - by_index[None], "total": len(examples),
            "by_index": {k: by_index[k] for k in order}}


# ----------------------------------------------------------------------------------------------------
# Splits
#
# The paper: Train = official train (65,719 examples / 8,939 dialogues), Valid#1 ≈ 6,500 examples (where the
# DPO pairs come from), Valid#2 ≈ 1,301 (validation), Test = official test (7,512 / 968). The official valid
# set (7,801 / 1,000) is cut once, in file order, at the dialogue boundary closest to VALID1_TARGETS examples,
# so no dialogue is in both parts and the cut is the same on every machine. Baidu-Persona-Chat (Chinese): the
# paper's Valid#1 has 14,000 examples and Valid#2 3,027. The target is chosen by the valid file's format.
# The paper trains and validates on revised personas and tests on the original ones (PERSONA_VARIANTS).

VALID1_TARGETS = {"personachat": 6500, "baidu": 14_000}  # by file_format
VALID1_TARGET = VALID1_TARGETS["personachat"]
SPLITS = ("train", "valid1", "valid2", "test")
SPLIT_TITLES = {"train": "Train", "valid1": "Valid#1", "valid2": "Valid#2", "test": "Test"}


def _group_by_dialogue(examples: Sequence[Example]) -> list[list[Example]]:
    """Examples grouped by dialogue_id, groups in order of first appearance."""
    groups: dict[int, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.dialogue_id, []).append(e)
    return list(groups.values())


def split_valid(examples: Sequence[Example], valid1_target: int = VALID1_TARGET) -> tuple[list, list]:
    """(valid1, valid2): the valid examples cut at the dialogue boundary nearest to valid1_target examples."""
    groups = _group_by_dialogue(examples)
    before = [0] + list(accumulate(len(g) for g in groups))  # before[k]: examples in the first k dialogues
    cut = min(range(len(before)), key=lambda k: abs(before[k] - valid1_target))  # the first of equal ones
    return [e for g in groups[:cut] for e in g], [e for g in groups[cut:] for e in g]


def carve_splits(examples: Sequence[Example], limit: int | None = None,
                 fractions: Sequence[float] = (0.6, 0.2, 0.1, 0.1)) -> dict[str, list[Example]]:
    """Disjoint train/valid1/valid2/test parts of one set of examples (when the official files are missing):
    whole dialogues in file order, `fractions` of the examples each, or with `limit` dialogues until a part
    holds >= limit examples, then cut to exactly limit (the rest of that dialogue is unused). A part may come
    out short or empty when the data runs out."""
    groups = _group_by_dialogue(examples)
    total = sum(len(g) for g in groups)
    if limit is not None:
        quotas = [limit] * len(SPLITS)
    else:
        if len(fractions) != len(SPLITS) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"fractions must be {len(SPLITS)} numbers summing to 1, got {fractions}")
        quotas = [round(f * total) for f in fractions]
    out, g_i = {}, 0
    for name, quota in zip(SPLITS, quotas):
        part: list[Example] = []
        while g_i < len(groups) and len(part) < quota:
            part.extend(groups[g_i])
            g_i += 1
        out[name] = part[:quota] if limit is not None else part
    return out


# Per persona setup, the ParlAI variant each split kind reads: "revised" is the paper's setup.
PERSONA_VARIANTS = {"original": {"train": "original", "valid": "original", "test": "original"},
                    "revised": {"train": "revised", "valid": "revised", "test": "original"}}

# File names per split kind, first match wins: ParlAI (PERSONA-CHAT/ConvAI2, original or revised personas),
# Baidu-Persona-Chat JSON lines (also what extras/zh_samples.py writes).
SPLIT_FILES = {kind: (f"{kind}_self_{{v}}.txt", f"{kind}.jsonl", f"{kind}.json") for kind in ("train", "valid", "test")}
SPLIT_FILES["valid"] += ("dev.jsonl", "dev.json")


def split_files(data_dir, variant: str | dict[str, str]) -> tuple[Path, dict[str, Path]]:
    """(directory, {"train"/"valid"/"test": the first SPLIT_FILES name present}) in data_dir or data_dir/personachat.
    variant: the ParlAI persona variant of every file ("original", "revised"), or one per kind (PERSONA_VARIANTS)."""
    variants = variant if isinstance(variant, dict) else {kind: variant for kind in SPLIT_FILES}
    for d in (Path(data_dir), Path(data_dir) / "personachat"):
        found = {kind: [d / n.format(v=variants[kind]) for n in names] for kind, names in SPLIT_FILES.items()}
        present = {kind: next(p for p in paths if p.is_file()) for kind, paths in found.items()
                   if any(p.is_file() for p in paths)}
        if present:
            return d, present
    names = ", ".join(SPLIT_FILES["valid"]).format(v=variants["valid"])
    raise FileNotFoundError(f"no split file ({names} or the train/"
                            f"test equivalents) in {data_dir} or {Path(data_dir) / 'personachat'}; for "
                            f"PERSONA-CHAT run `python extras/download.py --data-dir {data_dir}`")


@dataclass
class SplitInfo:
    carved: bool                         # True when parts were carved out of what was present
    message: str                         # says which files were used and how (print it)
    stats: dict[str, ParseStats] = field(default_factory=dict)  # per file kind: "train", "valid", "test"
    sources: dict[str, list[Example]] = field(default_factory=dict)  # all examples of each file kind


def _persona_files(data_dir, personas: str) -> tuple[Path, dict[str, Path]]:
    """split_files for a PERSONA_VARIANTS setup, where each of the three ParlAI files must be present."""
    if personas not in PERSONA_VARIANTS:
        raise ValueError(f"unknown personas {personas!r} (use one of {', '.join(PERSONA_VARIANTS)})")
    variants = PERSONA_VARIANTS[personas]
    d, present = split_files(data_dir, variants)
    for kind, v in variants.items():
        wanted = d / SPLIT_FILES[kind][0].format(v=v)
        if present.get(kind) != wanted:
            raise FileNotFoundError(f"{wanted} is missing (personas={personas!r} reads train/valid "
                                    f"{variants['train']}, test {variants['test']})")
    return d, present


def load_splits(data_dir, variant: str = "original", limit: int | None = None,
                labeler: str | Callable | None = "lexical",
                personas: str | None = None) -> tuple[dict[str, list[Example]], SplitInfo]:
    """The paper's four splits from a data directory (SPLIT_FILES): the official files when train, valid and test
    are present (valid cut by split_valid at the VALID1_TARGETS size of its format), else carved from what is
    there (carve_splits; info.message says so). `limit`: the first `limit` examples of each split.
    variant: the ParlAI persona variant of every file. personas: instead, a PERSONA_VARIANTS setup ("revised":
    the paper's), whose three files must all be present (FileNotFoundError naming the one missing)."""
    d, present = _persona_files(data_dir, personas) if personas is not None else split_files(data_dir, variant)
    files = ", ".join(f"{k} {v}" for k, v in PERSONA_VARIANTS[personas].items()) if personas else variant
    loaded, stats, next_id = {}, {}, 0
    for k, p in present.items():
        dialogues = read_dialogues(p, first_id=next_id)  # dialogue ids unique across files
        next_id = max((x.dialogue_id for x in dialogues), default=next_id - 1) + 1
        stats[k] = dialogues.stats
        loaded[k] = make_examples(dialogues, labeler)
    if set(present) == {"train", "valid", "test"}:
        v1, v2 = split_valid(loaded["valid"], VALID1_TARGETS[file_format(present["valid"])])
        splits = {"train": loaded["train"], "valid1": v1, "valid2": v2, "test": loaded["test"]}
        if limit is not None:
            splits = {k: v[:limit] for k, v in splits.items()}
        msg = f"official splits from {d} ({files}); valid cut into Valid#1/Valid#2 at a dialogue boundary"
        return splits, SplitInfo(False, msg, stats, loaded)
    pool = [e for k in ("train", "valid", "test") if k in loaded for e in loaded[k]]
    splits = carve_splits(pool, limit)
    names = ", ".join(p.name for p in present.values())
    missing = ", ".join(k for k in SPLIT_FILES if k not in present)
    msg = (f"no {missing} file in {d}: train/valid1/valid2/test carved at dialogue boundaries out of "
           f"{names} (" + ", ".join(f"{SPLIT_TITLES[k]} {len(v)}" for k, v in splits.items()) +
           " examples); these are NOT the paper's splits")
    return splits, SplitInfo(True, msg, stats, loaded)


def last_turns(examples: Sequence[Example], k: int | None) -> list[Example]:
    """The examples with their history cut to its last k utterances (k None: unchanged; 0: no history)."""
    if k is None:
        return list(examples)
    if k < 0:
        raise ValueError(f"history turns must be >= 0, got {k}")
    return [replace(e, history=e.history[len(e.history) - k:] if k < len(e.history) else list(e.history))
            for e in examples]


def table1(splits: dict[str, list[Example]]) -> str:
    """The paper's Table 1 layout (#dialogues, #examples per split) as a Markdown table."""
    rows = [f"| {SPLIT_TITLES[k]} | {len({e.dialogue_id for e in splits[k]})} | {len(splits[k])} |"
            for k in SPLITS if k in splits]
    return "\n".join(["| Split | #Dialogues | #Examples |", "|---|---:|---:|"] + rows)


# ----------------------------------------------------------------------------------------------------
# Prompts (our own wording; structure follows the paper's four uses)
#
#   select    numbered personas + history              -> the number of the relevant persona sentence, or 0
#   select_sentence  the same question                 -> "k.sentence" (the authors' target), or SELECT_NONE
#   generate  personas + history + highlighted persona  -> the response (training: gold label's persona;
#             select-then-generate: the persona the model selected — pass it as `persona=`)
#   personas  personas + history, nothing highlighted   -> the response (zero-shot, Not Select, +Prompting)
#   history   history only                              -> the response (samples DPO's rejected responses)
#   noprompt  personas and history as plain lines       -> the response (fine-tuning without prompts)
# Every prompt ends with a newline and the target starts right after it, so that for BPE tokenizers the
# prompt's tokens are a prefix of the tokens of prompt + target (checked in encode_prompt_target).

NO_PERSONA = {"en": "No persona sentence applies.", "zh": "没有相关的人设。"}
# The selection task's answer, two ways (--select-target): the sentence's number ("2"; "0": none), or the authors'
# "k.sentence" ("2.i like cats"; their Chinese "2。..."), with their words for none.
SELECT_MODES = {"number": "select", "sentence": "select_sentence"}
SELECT_NONE = {"en": "No personal description.", "zh": "无需个性化信息。"}
MODES = ("select", "select_sentence", "generate", "personas", "history", "noprompt")

_TEXT = {
    "en": {
        "partner": "Partner", "you": "You", "empty": "(nobody has spoken yet)",
        "select": ("Here is what you know about yourself and the conversation so far. Which single sentence "
                   "about yourself should your next reply build on? Answer with its number, or 0 if none of them "
                   "fits.\n\nAbout you:\n{personas}\n\nConversation:\n{history}\n\nNumber of the sentence to "
                   "build on:\n"),
        "select_sentence": ("Here is what you know about yourself and the conversation so far. Which single "
                            "sentence about yourself should your next reply build on? Answer with that sentence as "
                            "it is numbered below, or \"No personal description.\" if none of them fits.\n\n"
                            "About you:\n{personas}\n\nConversation:\n{history}\n\nThe sentence to build on:\n"),
        "generate": ("You are taking part in a conversation as the person described below.\n\nAbout you:\n"
                     "{personas}\n\nConversation:\n{history}\n\nKeep this in mind for your reply: {persona}\n"
                     "Write your next reply.\nReply:\n"),
        "personas": ("You are taking part in a conversation as the person described below.\n\nAbout you:\n"
                     "{personas}\n\nConversation:\n{history}\n\nWrite your next reply.\nReply:\n"),
        "history": "Continue the conversation below with your next reply.\n\nConversation:\n{history}\n\nReply:\n",
    },
    "zh": {
        "partner": "对方", "you": "你", "empty": "（还没有人说话）",
        "select": ("下面是关于你自己的描述和目前的对话。你接下来的回复应该以哪一句描述为依据？请写出它的编号；"
                   "如果都不合适，请写 0。\n\n关于你：\n{personas}\n\n对话：\n{history}\n\n依据的句子编号：\n"),
        "select_sentence": ("下面是关于你自己的描述和目前的对话。你接下来的回复应该以哪一句描述为依据？请照下面的编号"
                            "写出那一句；如果都不合适，请写“无需个性化信息。”\n\n关于你：\n{personas}\n\n对话：\n"
                            "{history}\n\n依据的句子：\n"),
        "generate": ("你正在以下面描述的身份参与一段对话。\n\n关于你：\n{personas}\n\n对话：\n{history}\n\n"
                     "回复时请记住：{persona}\n请写出你的下一句回复。\n回复：\n"),
        "personas": "你正在以下面描述的身份参与一段对话。\n\n关于你：\n{personas}\n\n对话：\n{history}\n\n请写出你的下一句回复。\n回复：\n",
        "history": "请接着下面的对话写出你的下一句回复。\n\n对话：\n{history}\n\n回复：\n",
    },
}


def build_prompt(mode: str, personas: Sequence[str], history: Sequence[str], lang: str = "en",
                 persona: str | None = None) -> str:
    """The prompt text for one mode (see the table above). `persona` is the highlighted persona sentence of
    the generate mode (None -> the NO_PERSONA sentinel)."""
    if lang not in _TEXT:
        raise ValueError(f"unknown language {lang!r}, expected one of {sorted(_TEXT)}")
    t = _TEXT[lang]
    if mode == "noprompt":
        return "".join(p + "\n" for p in personas) + "".join(u + "\n" for u in history)
    if mode not in MODES:
        raise ValueError(f"unknown prompt mode {mode!r}, expected one of {MODES}")
    n = len(history)  # the last utterance is the partner's; speakers alternate backwards from there
    hist = "\n".join(f"{t['partner'] if (n - 1 - i) % 2 == 0 else t['you']}: {u}" for i, u in enumerate(history))
    # select answers a number; select_sentence copies one line of the list, written as its target is ("2.i like cats")
    bullets = [{"select": f"{k}. ", "select_sentence": selection_label(k, lang)}.get(mode, "- ")
               for k in range(1, len(personas) + 1)]
    return t[mode].format(personas="\n".join(b + p for b, p in zip(bullets, personas)) or "-",
                          history=hist or t["empty"], persona=persona if persona is not None else NO_PERSONA[lang])


class _Gold:
    """Marker for "highlight the gold label's persona" (training only). At generation time the highlighted
    persona is always passed explicitly: a selected sentence, or None for the NO_PERSONA sentinel, so the
    gold persona can never leak into select-then-generate by a forgotten argument."""

    def __repr__(self):
        return "GOLD"


GOLD = _Gold()


def gold_persona(ex: Example, lang: str = "en") -> str:
    """The persona sentence of the example's label, or the NO_PERSONA sentinel."""
    return ex.personas[ex.persona_label] if ex.persona_label is not None else NO_PERSONA[lang]


def prompt_and_target(ex: Example, mode: str, lang: str = "en", persona: str | None | _Gold = GOLD,
                      history: Sequence[str] | None = None) -> tuple[str, str]:
    """(prompt, target) for an example. The selection modes' target names the gold persona (selection_target); the
    other modes' target is the response. generate highlights `persona`: GOLD (default, training) = the gold
    label's sentence, a string = that sentence (select-then-generate), None = the NO_PERSONA sentinel.
    `history` overrides the example's history (used by truncation)."""
    persona = gold_persona(ex, lang) if persona is GOLD else persona
    prompt = build_prompt(mode, ex.personas, ex.history if history is None else history, lang, persona)
    return prompt, selection_target(ex, mode, lang) if mode in SELECT_MODES.values() else ex.response


def selection_label(k: int, lang: str = "en") -> str:
    """How the authors write the k-th persona sentence's place before it: "2." (Chinese "2。")."""
    return f"{k}{'。' if lang == 'zh' else '.'}"


def selection_target(ex: Example, mode: str = "select", lang: str = "en") -> str:
    """What the selection task answers. mode "select": the labelled persona sentence's number in the prompt's
    list, 1-based, or "0" when no persona applies. mode "select_sentence" (the authors'): "k.sentence", or
    SELECT_NONE. On SmolLM2 the number helped: trained to copy a sentence out of its prompt, the 135M model copied
    sentences into its replies too (docs/measurements.md, "PAL's effect at small scale")."""
    if mode == "select_sentence":
        k = ex.persona_label
        return selection_label(k + 1, lang) + ex.personas[k] if k is not None else SELECT_NONE[lang]
    return str(ex.persona_label + 1) if ex.persona_label is not None else "0"


def parse_selection(text: str, personas: Sequence[str], lang: str = "en") -> str | None:
    """Map a model's selection output back to one of the personas, or None (no persona applies / no match):
    a leading number k picks the k-th sentence (0 or out of range: None); other text (an untrained model) is
    matched to a sentence, exactly, then by the best lexical overlap. Select-then-generate highlights it."""
    s = text.strip().split("\n")[0].strip()
    number = re.match(r"\d+", s)
    if number:
        k = int(number.group())
        return personas[k - 1] if 1 <= k <= len(personas) else None
    if not s or s in NO_PERSONA.values() or s in SELECT_NONE.values():
        return None
    for p in personas:
        if s == p.strip():
            return p
    i = lexical_persona_label(personas, s, min_overlap=1, min_ratio=0.5)
    return personas[i] if i is not None else None


def cjk_share(examples: Sequence[Example]) -> float:
    """The share of examples whose response or personas hold a CJK character."""
    has = [bool(CJK_CHAR.search(e.response) or any(CJK_CHAR.search(p) for p in e.personas)) for e in examples]
    return sum(has) / max(len(has), 1)


def detect_lang(examples: Sequence[Example]) -> str:
    """'zh' when most examples hold CJK characters, else 'en': a CJK name in a few English dialogues (or a
    few English lines in Chinese ones) does not switch a run's prompts and metrics."""
    return "zh" if cjk_share(examples) > 0.5 else "en"


# ----------------------------------------------------------------------------------------------------
# Encoding: (prompt, target) -> {"input_ids", "labels"}
#
# Plain tokenizers: ids = [bos] + encode(prompt + target) + [eos], tokenized together (what the model sees at
# generation time is encode(prompt) followed by generated tokens, so we insist the prompt's ids are a prefix).
# Chat tokenizers: the prompt is the user turn of tok.chat(..., add_generation_prompt=True); the full
# sequence is the same chat with the target as the assistant turn, cut right after the reply terminator (the
# first stop id after the prompt). Labels are IGNORE (-100) on the prompt part, equal to the ids on the target.


class PromptPrefixError(ValueError):
    pass


def _encode_text(tok, prompt: str, target: str | None, shots: Sequence[tuple[str, str]] = ()) -> list[int]:
    """ids of the prompt alone (target None: what generation starts from) or of prompt and target together.
    shots: (prompt, reply) demonstrations put first (few-shot): earlier chat turns, or text before the prompt."""
    if tok.has_chat:
        turns = [{"role": r, "content": c} for p, reply in shots for r, c in (("user", p), ("assistant", reply))]
        turns += [{"role": "user", "content": prompt}]
        turns += [{"role": "assistant", "content": target}] if target is not None else []
        return list(tok.chat(turns, add_generation_prompt=target is None))
    # GPT-2's <|endoftext|> is both BOS and EOS and GPT-2 fine-tuning does not start with it.
    bos = [tok.bos_id] if tok.bos_id is not None and tok.bos_id != tok.eos_id else []
    return bos + list(tok.encode("".join(p + reply + "\n\n" for p, reply in shots) + prompt + (target or "")))


def encode_prompt(tok, prompt: str, shots: Sequence[tuple[str, str]] = ()) -> list[int]:
    """The ids a model is given at generation time for this prompt (after the demonstrations `shots`)."""
    return _encode_text(tok, prompt, None, shots)


def demonstrations(examples: Sequence[Example], k: int, seed: int = 0, lang: str = "en",
                   turns: int = 2) -> list[tuple[str, str]]:
    """Few-shot demonstrations from k different dialogues (drawn with `seed`), one turn of each (drawn too):
    (the persona-list prompt of that turn with its last `turns` history utterances, its gold reply) -- short
    enough that k of them leave room for the prompt they precede."""
    dialogues = _group_by_dialogue(examples)
    if k > len(dialogues):
        raise ValueError(f"{k} demonstrations: there are only {len(dialogues)} dialogues to draw them from")
    rng = random.Random(seed)
    shown = [rng.choice(d) for d in rng.sample(dialogues, k)]
    return [(build_prompt("personas", e.personas, e.history[-turns:], lang), e.response) for e in shown]


def encode_prompt_target(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, target_ids): target_ids end with EOS (plain) or the reply terminator (chat)."""
    prompt_ids, full = encode_prompt(tok, prompt), _encode_text(tok, prompt, target)
    n = len(prompt_ids)
    if full[:n] != prompt_ids:
        at = next((i for i, (a, b) in enumerate(zip(full, prompt_ids)) if a != b), min(len(full), n))
        raise PromptPrefixError(
            f"the prompt's token ids are not a prefix of prompt+target's (first difference at position {at} "
            f"of {n}: prompt ...{tok.decode(prompt_ids[max(0, at - 3): at + 3])!r} vs full "
            f"...{tok.decode(full[max(0, at - 3): at + 3])!r}); end the prompt with a newline or change the "
            f"template so the target starts a new token")
    target_ids = full[n:]
    if tok.has_chat:
        stops = set(tok.stop_ids)
        end = next((i for i, t in enumerate(target_ids) if t in stops), None)
        target_ids = target_ids[: end + 1] if end is not None else target_ids + [tok.stop_ids[0]]
    else:
        target_ids = target_ids + [tok.eos_id]
    return prompt_ids, target_ids


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0                   # examples that lost at least one history utterance
    dropped_utterances: int = 0          # history utterances removed in total
    overlong: int = 0                    # still > max_len with only the partner's last message left, of which:
    left_out: int = 0                    #   features the feature lists (sft_, mixed_task_, dpo_features) left out
    cut: int = 0                         #   generation prompts cut to their last max_len ids
    max_length: int = 0                  # longest sequence encoded (before leaving out or cutting)

    def add(self, start: int, longest: int, max_len: int | None) -> None:
        """Count one encoded example that lost its `start` oldest history utterances and is `longest` ids long."""
        self.examples += 1
        self.truncated += start > 0
        self.dropped_utterances += start
        self.overlong += max_len is not None and longest > max_len
        self.max_length = max(self.max_length, longest)

    def summary(self) -> str:
        return (f"{self.examples} encoded, {self.truncated} truncated ({self.dropped_utterances} oldest history "
                f"utterances dropped), {self.overlong} still over the limit ({self.left_out} left out, {self.cut} "
                f"prompts cut), longest {self.max_length} tokens")


def encode_example(tok, ex: Example, mode: str, lang: str = "en", max_len: int | None = None,
                   persona: str | None | _Gold = GOLD, stats: EncodeStats | None = None,
                   target: str | None = None) -> dict:
    """Feature {"input_ids", "labels"} for one example and prompt mode. Over max_len, the oldest history
    utterances are dropped (down to the partner's last message; personas and target are never cut); a sequence
    still too long is returned and counted in stats.overlong (sft_features leaves it out). `target` overrides
    the target text."""
    feat, _ = _encode_truncated(tok, ex, mode, lang, max_len, persona, stats, [target] if target else None)
    return feat[0]


def _drop_oldest(encode_from: Callable, n_history: int, max_len: int | None) -> tuple[int, tuple]:
    """(start, encode_from(start)) for the smallest start (number of oldest history utterances dropped) whose
    length fits max_len, keeping at least the partner's last message; encode_from(start) -> (ids..., length).
    Fewer utterances never make a sequence longer, so the start is found by bisection (a handful of
    tokenizations, not one per utterance). When even the shortest does not fit, that one is returned."""
    best = encode_from(0)
    min_start = max(0, n_history - 1)  # keep at least the partner's last message
    if max_len is None or best[1] <= max_len or min_start == 0:
        return 0, best
    lo, hi = 1, min_start  # invariant: dropping hi utterances fits, or hi == min_start
    best = encode_from(hi)
    while best[1] <= max_len and lo < hi:
        mid = (lo + hi) // 2
        cand = encode_from(mid)
        if cand[1] <= max_len:
            hi, best = mid, cand
        else:
            lo = mid + 1
    return hi, best


def _encode_truncated(tok, ex, mode, lang, max_len, persona, stats, targets):
    """Encode one prompt with one or more targets (DPO: chosen and rejected), dropping the oldest history
    utterances until every sequence fits max_len (_drop_oldest). -> (features, utterances dropped)."""
    def encode_from(start):  # -> (pairs of (prompt_ids, target_ids), longest total length)
        prompt, gold_target = prompt_and_target(ex, mode, lang, persona, history=ex.history[start:])
        pairs = [encode_prompt_target(tok, prompt, t) for t in (targets or [gold_target])]
        return pairs, max(len(p) + len(t) for p, t in pairs)

    start, (pairs, longest) = _drop_oldest(encode_from, len(ex.history), max_len)
    if stats is not None:
        stats.add(start, longest, max_len)
    return [{"input_ids": p + t, "labels": [IGNORE] * len(p) + t} for p, t in pairs], start


def encode_generation_prompt(tok, ex: Example, mode: str, lang: str = "en", persona: str | None | _Gold = None,
                             max_len: int | None = None, stats: EncodeStats | None = None,
                             shots: Sequence[tuple[str, str]] = ()) -> tuple[list[int], int]:
    """(prompt ids a model generates from, number of oldest history utterances dropped so that the prompt
    holds at most max_len ids). Used for the DPO rejected samples (mode "history") and select-then-generate
    ("select", then "generate" with persona=the selected sentence, None = NO_PERSONA). Unlike training, the
    default here is NOT the gold persona; pass persona=GOLD explicitly for an oracle run. `shots`: few-shot
    demonstrations before the prompt (see demonstrations). A prompt still over max_len keeps its last max_len
    ids, the end that asks for the reply (stats.cut): every example gets one."""
    def encode_from(start):  # -> (prompt ids, their length)
        ids = encode_prompt(tok, prompt_and_target(ex, mode, lang, persona, history=ex.history[start:])[0], shots)
        return ids, len(ids)

    start, (ids, n) = _drop_oldest(encode_from, len(ex.history), max_len)
    stats = stats if stats is not None else EncodeStats()
    stats.add(start, n, max_len)
    if max_len is not None and n > max_len:
        stats.cut += 1
        ids = ids[n - max_len:]
    return ids, start


def _progress(it, total, desc):  # a progress bar for long encodings only
    return tqdm(it, total=total, desc=desc, disable=total < 2000, leave=False, mininterval=2.0)


def _fitting(features: list[dict], max_len: int | None, stats: EncodeStats) -> list[dict]:
    """The features whose sequences (input_ids; DPO: both sides) hold at most max_len ids. The others are over
    even with the oldest history gone (a runaway utterance, or a max_len too short for the personas): training
    on them would overflow the model's positions, so they are left out, counted in stats.left_out."""
    if max_len is None:
        return features
    kept = [f for f in features if all(len(v) <= max_len for k, v in f.items() if k.endswith("input_ids"))]
    stats.left_out += len(features) - len(kept)
    return kept


def sft_features(tok, examples: Sequence[Example], mode: str = "generate", lang: str = "en",
                 max_len: int | None = None, personas: Sequence[str | None] | None = None
                 ) -> tuple[list[dict], EncodeStats]:
    """One feature per example for one prompt mode, except those over max_len (see _fitting). `personas` (one
    per example: a sentence, None for NO_PERSONA, or GOLD) gives the highlighted persona of the generate mode;
    default: the gold label's."""
    stats = EncodeStats()
    feats = [encode_example(tok, ex, mode, lang, max_len, GOLD if personas is None else personas[k], stats)
             for k, ex in _progress(enumerate(examples), len(examples), f"encode {mode}")]
    return _fitting(feats, max_len, stats), stats


def mixed_task_features(tok, examples: Sequence[Example], select_ratio: float = 1.0, seed: int = 0,
                        lang: str = "en", max_len: int | None = None, select_none_ratio: float = 1.0,
                        select_mode: str = "select") -> tuple[list[dict], EncodeStats]:
    """PAL's mixed-task SFT data: a persona-enhanced generation feature for every example plus a persona
    selection feature for a `select_ratio` share of them (1.0: every example; the chosen ones are drawn with
    `seed`), shuffled together with `seed` so both tasks are interleaved. Each feature carries "task".
    select_none_ratio: the share of unlabelled examples ("no persona applies", the most frequent selection
    target) that keep their selection feature (the authors' "mixture_R" data mode; 1.0 = all of them).
    select_mode: the selection prompt and target, "select" (a number) or "select_sentence" (SELECT_MODES).
    Features over max_len are left out (see _fitting)."""
    for name, r in (("select_ratio", select_ratio), ("select_none_ratio", select_none_ratio)):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {r}")
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(examples)), round(select_ratio * len(examples))))
    unlabelled = sorted(k for k in chosen if examples[k].persona_label is None)
    chosen -= set(rng.sample(unlabelled, len(unlabelled) - round(select_none_ratio * len(unlabelled))))
    stats = EncodeStats()
    feats = []
    for k, ex in _progress(enumerate(examples), len(examples), "encode mixed"):
        feats.append({**encode_example(tok, ex, "generate", lang, max_len, stats=stats), "task": "generate"})
        if k in chosen:
            feats.append({**encode_example(tok, ex, select_mode, lang, max_len, stats=stats), "task": "select"})
    feats = _fitting(feats, max_len, stats)
    rng.shuffle(feats)
    return feats, stats


def dpo_feature(tok, ex: Example, rejected: str, mode: str = "generate", lang: str = "en",
                max_len: int | None = None, persona: str | None | _Gold = GOLD, stats: EncodeStats | None = None,
                chosen: str | None = None) -> dict:
    """DPO feature: the same prompt (truncated so that both fit) with chosen = the gold response (or
    `chosen`) and rejected = a generated response; keys chosen_/rejected_ + input_ids/labels. Like
    encode_example, a pair still over max_len is returned and counted (dpo_features leaves it out)."""
    (c, r), _ = _encode_truncated(tok, ex, mode, lang, max_len, persona, stats,
                                  [chosen if chosen is not None else ex.response, rejected])
    return {"chosen_input_ids": c["input_ids"], "chosen_labels": c["labels"],
            "rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"]}


def dpo_features(tok, examples: Sequence[Example], rejected: Sequence[str], mode: str = "generate",
                 lang: str = "en", max_len: int | None = None) -> tuple[list[dict], EncodeStats]:
    """DPO features of the examples and their rejected responses, except pairs over max_len (see _fitting)."""
    if len(rejected) != len(examples):
        raise ValueError(f"{len(rejected)} rejected responses for {len(examples)} examples")
    stats = EncodeStats()
    feats = [dpo_feature(tok, ex, r, mode, lang, max_len, stats=stats)
             for ex, r in _progress(zip(examples, rejected), len(examples), "encode dpo")]
    return _fitting(feats, max_len, stats), stats


# ----------------------------------------------------------------------------------------------------
# Collate: features -> right-padded LongTensor batches. Masks come from lengths, never from token == pad
# (GPT-2's pad id is its EOS id, which also appears as a real target token).


def _pad(seqs: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    T = int(lengths.max()) if len(seqs) else 0
    out = torch.tensor([list(s) + [value] * (T - len(s)) for s in seqs], dtype=torch.long).view(len(seqs), T)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T) 1 on real tokens
    return out, mask


def collate_sft(features: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """{"input_ids", "labels", "attention_mask"}: LongTensors (B, T), right-padded; labels -100 on prompt+pad."""
    for f in features:
        if len(f["input_ids"]) != len(f["labels"]):
            raise ValueError(f"feature with {len(f['input_ids'])} input_ids but {len(f['labels'])} labels")
    input_ids, mask = _pad([f["input_ids"] for f in features], pad_id)
    labels, _ = _pad([f["labels"] for f in features], IGNORE)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def collate_dpo(features: Sequence[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """chosen_/rejected_ + input_ids/labels/attention_mask, each (B, T_side), right-padded."""
    out = {}
    for side in ("chosen", "rejected"):
        b = collate_sft([{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]} for f in features],
                        pad_id)
        out.update({f"{side}_{k}": v for k, v in b.items()})
    return out


# ==============================================================================================================
# Part 2. Tokenizers
# ==============================================================================================================
#
# Rebuilt from a model directory's own files, tested id for id against Hugging Face's (tests/test_data_tokenizers.py).
# One class per algorithm: BPETokenizer (byte-level BPE on tiktoken: GPT-2, DialoGPT, SmolLM2, RoBERTa, Llama 3),
# SentencePieceTokenizer (Llama 2), WordPieceTokenizer (GPT-2 Chinese, BERT). Reading the files (tokenizer.json,
# merges, tiktoken and vocab files) is infra/tokfiles.py; load_tokenizer builds the class they call for.
# The rule for all: encode(text) never makes a special token ("<|endoftext|>" in user text is encoded as its
# characters); only code puts special ids in (chat, encode_pair, bos=True), so data cannot inject them.

class Tokenizer:
    """Common interface: subclasses implement `_encode` and `decode`. `specials` maps special text -> id."""

    def __init__(self, name: str, specials: dict[str, int], vocab_size: int, *, bos: str | None, eos: str | None,
                 pad: str | None, stops: list[str], chat_format: str | None = None, default_system: str | None = None):
        self.name = name
        self.specials = dict(specials)
        self.vocab_size = vocab_size                      # max id + 1: rows the model's embedding must have
        self.bos_id = self.token_id(bos)
        self.eos_id = self.token_id(eos)
        self.pad_id = self.token_id(pad) if pad is not None else self.eos_id
        self.stop_ids = [self.token_id(s) for s in stops]
        self.chat_format = chat_format                    # None, "llama3" or "chatml"
        self.default_system = default_system              # chatml: system prompt added when none is given
        self.has_chat = chat_format is not None

    def token_id(self, text: str | None) -> int | None:
        """Id of a special token by its text, e.g. tok.token_id("<|eot_id|>"); None for None."""
        if text is not None and text not in self.specials:
            raise TokenizerError(f"{self.name}: special token {text!r} is not in the vocabulary")
        return None if text is None else self.specials[text]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        for wanted, i, what in ((bos, self.bos_id, "bos"), (eos, self.eos_id, "eos")):
            if wanted and i is None:
                raise TokenizerError(f"{self.name}: this tokenizer has no {what} token")
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        raise NotImplementedError

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


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 family, SmolLM2, RoBERTa, Llama 3) run by tiktoken.

    tiktoken merges, inside each regex piece, the adjacent pair whose concatenation has the lowest *rank*;
    Hugging Face merges the pair that comes first in merges.txt. Giving each merged token the index of the merge
    that creates it as its rank makes the two agree whenever a token is only ever reached through its own merge,
    which BPE training makes the rule (not a theorem: the tests check it on real and fuzzed text for GPT-2 and
    SmolLM2). Where the model's ids are another numbering (RoBERTa: fairseq's dictionary order), `_rank_to_id`
    maps tiktoken's output to them."""

    def __init__(self, name: str, ranks: dict[bytes, int], split: str, id_of_rank: dict[int, int] | None,
                 specials: dict[str, int], *, add_prefix_space: bool = False, **kw):
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
        self._drop = bool(dropped)  # out-of-vocabulary byte ids (< 0 or >= n) must be removed from the output
        # id -> bytes for decoding (specials decode to their own text, like HF with skip_special_tokens=False).
        self._id_bytes: list[bytes | None] = [None] * n
        for b, r in ranks.items():
            if 0 <= ids_of(r) < n:
                self._id_bytes[ids_of(r)] = b
        for t, i in specials.items():
            self._id_bytes[i] = t.encode("utf-8")
        self._special_set = set(specials.values())
        super().__init__(name, specials, n, **kw)

    def _encode(self, text: str) -> list[int]:
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        ids = self._enc.encode_ordinary(text)
        if self._rank_to_id is not None:
            ids = [self._rank_to_id[r] for r in ids]
        if self._drop and ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # min/max: a fast check in C
            ids = [i for i in ids if 0 <= i < self.vocab_size]
        return ids

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
        cls, sep = self.token_id("<s>"), self.token_id("</s>")
        return [cls] + self._encode(a) + [sep, sep] + self._encode(b) + [sep]


class SentencePieceTokenizer(Tokenizer):
    """Llama 2: the sentencepiece model itself (Meta's reference), ids straight from the .model file.

    Hugging Face's LlamaTokenizer (legacy=False) agrees on ordinary text; on a leading space and on runs of
    spaces before a word we follow sentencepiece (tests/test_data_tokenizers.py lists the cases)."""

    def __init__(self, path: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        specials = {pieces[i]: i for i in range(len(pieces)) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        bos, eos = pieces[self.sp.bos_id()], pieces[self.sp.eos_id()]
        pad = pieces[self.sp.pad_id()] if self.sp.pad_id() >= 0 else None
        super().__init__(path.parent.name, specials, len(pieces), bos=bos, eos=eos, pad=pad, stops=[eos])

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:  # sentencepiece's C++ threads
        return self.sp.encode(texts, num_threads=min(os.cpu_count() or 1, 8))

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        if skip_special:
            return self.sp.decode(list(ids))
        out, run = [], []  # sentencepiece drops control pieces; show them like HF does
        for i in ids:
            if i in self.specials.values():
                out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self.sp.decode(run)])


@lru_cache(maxsize=65536)
def _bert_char_kind(ch: str) -> str:
    """How BERT's basic tokenizer treats one character: drop, space, cjk, punct or other."""
    cp = ord(ch)
    cat = unicodedata.category(ch)
    if ch in "\t\n\r" or (not cat.startswith("C") and ch.isspace()):
        return "space"
    if cp == 0 or cp == 0xFFFD or cat.startswith("C"):
        return "drop"
    if CJK_CHAR.match(ch):
        return "cjk"
    # every non-alphanumeric ASCII symbol is punctuation, even "$" or "^" which Unicode calls symbols
    ascii_symbol = 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
    return "punct" if ascii_symbol or cat.startswith("P") else "other"


_ASCII_CONTROL = {c: None for c in list(range(32)) + [127] if chr(c) not in "\t\n\r"}
_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


class WordPieceTokenizer(Tokenizer):
    """BERT WordPiece (GPT-2 Chinese uses BERT's vocab.txt): basic tokenization, then greedy longest match.

    Basic tokenization: drop NUL / U+FFFD / control characters, map whitespace to " ", put spaces around every
    CJK ideograph (so each is its own word), lower-case and strip accents if the config says so, then split on
    whitespace and punctuation. WordPiece: longest vocab prefix, continuations prefixed "##"; a word that cannot be
    covered (or is longer than 100 characters) becomes [UNK] as a whole.
    """

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

    def _words(self, text: str) -> list[str]:
        if text.isascii():
            # the same steps on ASCII text, in C: drop control characters, lower-case, then each run of letters
            # and digits is a word and every other visible character (all ASCII symbols are BERT punctuation) too.
            text = text.translate(_ASCII_CONTROL)
            return _ASCII_WORDS.findall(text.lower() if self.lowercase else text)
        out = []
        for ch in text:
            kind = _bert_char_kind(ch)
            out.append(" " if kind == "space" else "" if kind == "drop" else f" {ch} " if kind == "cjk" else ch)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.lowercase:
            text = text.lower()
        # punctuation splits words (after the steps above, as in BERT): space it out, then split at spaces
        return "".join(f" {c} " if _bert_char_kind(c) == "punct" else c for c in text).split()

    def _wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first pieces of one word; the whole word is [UNK] when some rest has no piece."""
        if word in self._cache:
            return self._cache[word]
        ids, start = [], 0
        while start < len(word) <= 100:
            prefix = "##" if start else ""
            end = next((e for e in range(len(word), start, -1) if prefix + word[start:e] in self.vocab), None)
            if end is None:
                break
            ids.append(self.vocab[prefix + word[start:end]])
            start = end
        ids = ids if start == len(word) else [self.unk]
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


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a LOCAL model directory (or of one tokenizer file): infra/tokfiles.py reads the files the
    directory has, this builds the class of their algorithm. A hub id is the caller's to resolve."""
    kind, spec = read_tokenizer(path)
    return {"bpe": BPETokenizer, "sentencepiece": SentencePieceTokenizer, "wordpiece": WordPieceTokenizer}[kind](**spec)


def check_tokenizer_fits(tok: Tokenizer, model_or_vocab_size) -> None:
    """Raise if some id the tokenizer can produce has no row in the model's embedding (ids would index past it)."""
    n = model_or_vocab_size if isinstance(model_or_vocab_size, int) else model_or_vocab_size.config.vocab_size
    if tok.vocab_size > n:
        raise TokenizerError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids but the model's embedding has only "
                             f"{n} rows: this tokenizer does not belong to this model")
