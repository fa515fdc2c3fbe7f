"""Speed of our BLEU-1..4 + ROUGE-L against nltk + rouge-score, on all 7801 PERSONA-CHAT valid responses.

Each gold response is scored against the response at the same turn of the next dialogue. Both sides get the
same tokens (metric_tokens, computed once, not timed), both sides' results are checked equal, and the ratio
comes from this one run (best of --repeat timings each).

    python bench/bench_metrics.py [--data ../shared/data/personachat/valid_self_original.txt] [--repeat 3]
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import pal as M  # the metrics live in pal.py's evaluation part


def load_pairs(path: Path) -> tuple[list[str], list[str]]:
    dialogues = []
    for line in path.read_text(encoding="utf-8").splitlines():
        num, _, rest = line.partition(" ")
        if num == "1":
            dialogues.append([])
        if "\t" in rest:
            dialogues[-1].append(rest.split("\t")[1])
    hyps, refs = [], []
    for d, dialogue in enumerate(dialogues):
        other = dialogues[(d + 1) % len(dialogues)]
        for t, resp in enumerate(dialogue):
            hyps.append(resp)
            refs.append(other[t % len(other)])
    return hyps, refs


def ours_bleu(hyps, refs):
    return M.corpus_bleu(hyps, refs, max_n=4)


def ours_rouge(hyps, refs):
    return M.rouge_l(hyps, refs)


def nltk_bleu(hyps, refs):
    from nltk.translate.bleu_score import corpus_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # one nltk call computes BLEU-1..4 from one pass of statistics
        return corpus_bleu([[r] for r in refs], hyps, weights=[(1.0,), (0.5, 0.5), (1 / 3,) * 3, (0.25,) * 4])


def rouge_score_l(hyps, refs):
    from rouge_score import rouge_scorer

    class SplitTokenizer:  # hands our tokens to rouge-score unchanged
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=SplitTokenizer())
    # rouge-score's signature is score(target, prediction)
    f = [scorer.score(" ".join(r), " ".join(h))["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return sum(f) / len(f)


def best_time(fn, *args, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/personachat/valid_self_original.txt")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data}: not found (pass --data)")
    hyp_text, ref_text = load_pairs(args.data)
    t0 = time.perf_counter()
    hyps = [M.metric_tokens(h) for h in hyp_text]
    refs = [M.metric_tokens(r) for r in ref_text]
    t_tok = time.perf_counter() - t0
    print(f"{len(hyps)} pairs, {sum(map(len, hyps))} hypothesis tokens; metric_tokens on both sides: {t_tok:.3f}s")

    t_bo, b_ours = best_time(ours_bleu, hyps, refs, repeat=args.repeat)
    t_ro, r_ours = best_time(ours_rouge, hyps, refs, repeat=args.repeat)
    t_bn, b_ref = best_time(nltk_bleu, hyps, refs, repeat=args.repeat)
    t_rr, r_ref = best_time(rouge_score_l, hyps, refs, repeat=args.repeat)
    diff = max(max(abs(a - b) for a, b in zip(b_ours, b_ref)), abs(r_ours - r_ref))
    assert diff < 1e-6, f"results differ by {diff}"
    print("BLEU-1..4 " + " ".join(f"{100 * b:.4f}" for b in b_ours) + f"  ROUGE-L {100 * r_ours:.4f}  (x100)")
    print(f"max |ours - reference| = {diff:.2e}")
    print(f"{'':22s}{'ours':>10s}{'reference':>11s}{'speed-up':>10s}")
    for name, t_o, t_r in (("BLEU-1..4 vs nltk", t_bo, t_bn), ("ROUGE-L vs rouge-score", t_ro, t_rr),
                           ("both", t_bo + t_ro, t_bn + t_rr)):
        print(f"{name:22s}{t_o:9.3f}s{t_r:10.3f}s{t_r / t_o:9.1f}x")


if __name__ == "__main__":
    main()
