"""Reading data files without losing a line silently: a line that cannot be parsed is one DataFormatError naming
file:line and showing the line; an irregularity with a documented rule is counted in ParseStats and its first few
noted with their file:line. The parsers of PERSONA-CHAT and Baidu-Persona-Chat (data.py) use these."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

# A persona sentence or utterance longer than this is cut to it (counted in long_texts): PERSONA-CHAT's longest is
# 113 characters, and 10,000 characters (~2,500 GPT-2 tokens) already overflow any max_len, while a runaway
# megabyte line would make every tokenization slow (and tiktoken panics on a run of ~1M spaces).
MAX_TEXT_CHARS = 10_000


@dataclass
class ParseStats:
    """What a parser met, so that nothing is dropped without a trace."""
    files: list[str] = field(default_factory=list)
    lines: int = 0
    dialogues: int = 0
    examples: int = 0                    # turns with a response = examples make_examples will produce
    blank_lines: int = 0                 # skipped
    invalid_utf8_lines: int = 0          # decoded with U+FFFD replacement characters (strict_utf8 raises)
    silence_openers: int = 0             # `__SILENCE__` contexts: turn kept, the marker is no utterance
    empty_dialogues: int = 0             # dialogue without any response: no example possible, skipped
    no_persona_dialogues: int = 0        # dialogue without persona lines: kept, its prompts list no persona
    missing_responses: int = 0           # turn without response: message kept in history, no example
    numbering_gaps: int = 0              # turn number jumped forward (N -> N+2...): accepted as is
    numbering_restarts: int = 0          # number did not go back to 1 at a new dialogue: new dialogue anyway
    conversation_breaks: int = 0         # JSON lines whose history does not extend an earlier line's
    long_texts: int = 0                  # utterances / persona sentences cut to MAX_TEXT_CHARS characters
    notes: list[str] = field(default_factory=list)  # first few irregularities, with file:line
    sha256: dict[str, str] = field(default_factory=dict)  # {file: sha256 of the bytes parsed}: what a run read

    def count(self, what: str | None, msg: str) -> None:
        """One more irregularity of kind `what` (a counter above; None: a note only), noted with its file:line."""
        if what is not None:
            setattr(self, what, getattr(self, what) + 1)
        if len(self.notes) < 20:
            self.notes.append(msg)

    def summary(self) -> str:
        keys = [k for k, v in vars(self).items()
                if isinstance(v, int) and v and k not in ("lines", "dialogues", "examples")]
        return ", ".join(f"{k}={getattr(self, k)}" for k in keys)

    def report(self, first: int = 3) -> str:
        """For logs: the file(s), sizes and non-zero irregularity counters on one line, then the first `first`
        notes, each with its file:line, so that a problem can be found in the data."""
        counters = self.summary()
        lines = [f"{', '.join(Path(f).name for f in self.files)}: {self.dialogues} dialogues, {self.examples} "
                 f"examples" + (f" ({counters})" if counters else "")]
        lines += [f"    {note}" for note in self.notes[:first]]
        if len(self.notes) > first:
            lines.append(f"    ... {len(self.notes) - first} more noted (ParseStats.notes keeps the first 20)")
        return "\n".join(lines)


class DataFormatError(ValueError):
    """A file that cannot be read: the message names file:line and shows the line (lineno None: the whole file;
    a string such as "row 3": the 0-based row 3 of a file holding one JSON array)."""

    def __init__(self, path, lineno: int | str | None, line: str, reason: str):
        super().__init__(f"{path}:{lineno}: {reason}: {line[:300]!r}" if lineno is not None else f"{path}: {reason}")
        self.path, self.lineno, self.line, self.reason = str(path), lineno, line, reason


def read_lines(path: Path, stats: ParseStats, strict_utf8: bool) -> list[tuple[int, str]]:
    """(line number, text) for every line. Invalid UTF-8 raises when strict, else becomes U+FFFD (counted)."""
    out, digest = [], hashlib.sha256()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            digest.update(raw)
            raw = raw.rstrip(b"\r\n")
            line = raw.decode("utf-8", "replace")
            if line.encode("utf-8") != raw:  # some bytes were not UTF-8 and became U+FFFD
                if strict_utf8:
                    raise DataFormatError(path, lineno, line, "invalid UTF-8")
                stats.count("invalid_utf8_lines", f"{path}:{lineno}: invalid UTF-8 replaced by U+FFFD")
            out.append((lineno, line))
    stats.lines += len(out)
    stats.sha256[str(path)] = digest.hexdigest()
    return out


def capped(text: str, stats: ParseStats, where: str) -> str:
    """`text`, cut to MAX_TEXT_CHARS characters (counted, noted with `where` = file:line) when it is longer."""
    if len(text) <= MAX_TEXT_CHARS:
        return text
    stats.count("long_texts", f"{where}: text of {len(text)} characters cut to its first {MAX_TEXT_CHARS}")
    return text[:MAX_TEXT_CHARS]
