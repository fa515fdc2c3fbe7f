"""Convert the Chinese dialogue samples into the Baidu-Persona-Chat JSON lines that data.py reads.

    python extras/zh_samples.py SRC_DIR OUT_DIR      # e.g. ../shared/data/zh_samples data/zh

reads SRC_DIR/Person_Dialog_ZH_{train,test}.txt and writes OUT_DIR/{train,test}.jsonl, one
`[personas, history, response]` array per line; `python extras/data_stats.py --data-dir OUT_DIR` then reads them.

The sample format: blocks separated by `[SEP]` lines, each block three lines: the persona sentences run
together; `<|endoftext|>` followed by each history utterance terminated by `<|endoftext|>`; the response
terminated by `<|endoftext|>`. Blank lines are skipped. A malformed block raises data.DataFormatError naming
file:line. A block whose response is empty (or holds another `<|endoftext|>`) is written with an empty
response, which data.read_baidu_jsonl counts as a missing response (nothing disappears silently).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
from infra.files import atomic_path  # noqa: E402  (the project's one atomic writer)

EOT = "<|endoftext|>"
SPLIT_FILES = {"train": "Person_Dialog_ZH_train.txt", "test": "Person_Dialog_ZH_test.txt"}


def _block_row(path: Path, block: list[tuple[int, str]]) -> list:
    """One block of (line number, text) -> [personas, history, response]."""
    lineno0, first = block[0]
    if len(block) != 3:
        raise data.DataFormatError(path, lineno0, first, f"block of {len(block)} lines, 3 expected "
                                   "(personas, history, response)")
    (_, persona_line), (ln_h, hist_line), (_, resp_line) = block
    if not hist_line.startswith(EOT):
        raise data.DataFormatError(path, ln_h, hist_line, f"history line must start with {EOT}")
    if not resp_line.endswith(EOT):
        raise data.DataFormatError(path, block[2][0], resp_line, f"response line must end with {EOT}")
    history = [u.strip() for u in hist_line[len(EOT):].split(EOT)]
    if history and history[-1] == "":
        history.pop()  # the terminator of the last utterance
    if any(u == "" for u in history):
        raise data.DataFormatError(path, ln_h, hist_line, "empty utterance in the history")
    response = resp_line[: -len(EOT)].strip()
    return [data.split_sentences(persona_line), history, "" if EOT in response else response]


def read_zh_samples(path) -> list[list]:
    """[personas, history, response] for every block of a sample file, in file order."""
    path = Path(path)
    rows, block = [], []
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        line = raw.decode("utf-8", "replace")
        if line.encode("utf-8") != raw:  # some bytes were not UTF-8 (and became U+FFFD)
            raise data.DataFormatError(path, lineno, line, "invalid UTF-8")
        line = line.strip()
        if line == "[SEP]":
            rows += [_block_row(path, block)] if block else []
            block = []
        elif line:
            block.append((lineno, line))
    return rows + ([_block_row(path, block)] if block else [])


def convert(src_dir, out_dir) -> dict[str, Path]:
    """SRC_DIR's sample files -> OUT_DIR/{train,test}.jsonl (each written atomically); {split: path written}."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    present = {k: src_dir / name for k, name in SPLIT_FILES.items() if (src_dir / name).is_file()}
    if not present:
        raise FileNotFoundError(f"no {' or '.join(SPLIT_FILES.values())} in {src_dir}")
    written = {}
    for split, src in present.items():
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in read_zh_samples(src)]
        with atomic_path(out_dir / f"{split}.jsonl") as tmp:
            tmp.write_text("".join(lines), encoding="utf-8")
        written[split] = out_dir / f"{split}.jsonl"
        print(f"{src} -> {written[split]} ({len(lines)} examples)")
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src_dir", help="directory with Person_Dialog_ZH_train.txt / Person_Dialog_ZH_test.txt")
    ap.add_argument("out_dir", help="where train.jsonl / test.jsonl are written")
    args = ap.parse_args(argv)
    convert(args.src_dir, args.out_dir)


if __name__ == "__main__":
    main()
