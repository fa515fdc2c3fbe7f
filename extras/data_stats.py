"""The paper's Table 1 (dialogues and examples per split) and the persona-label distribution of a data directory.

    python extras/data_stats.py --data-dir DIR [--variant revised] [--limit N] [--labels none]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python extras/data_stats.py` finds the core too
import data  # noqa: E402


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a slice [:-1] would drop one example per split)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number of at least 1")
    return int(text)


def main(argv=None) -> None:
    s = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    s.add_argument("--data-dir", required=True)
    s.add_argument("--variant", default="original", choices=["original", "revised"])
    s.add_argument("--limit", type=positive_int, default=None,
                   help="examples per split (carved parts when no train/test)")
    s.add_argument("--labels", default="lexical", choices=["lexical", "none"],
                   help="lexical persona labels, or none (NLI labels: pal.py --labels nli)")
    args = s.parse_args(argv)
    labels = "lexical" if args.labels == "lexical" else None
    splits, info = data.load_splits(args.data_dir, args.variant, args.limit, labels)
    print(info.message)
    for k, st in info.stats.items():
        print(f"  {k}: {st.report()}")
    print(f"\n{data.table1(splits)}")
    if args.labels == "none":
        return
    print("\nPersona labels (lexical: content-word overlap, see data.py):")
    n_cols = 1 + max((e.persona_label for v in splits.values() for e in v if e.persona_label is not None),
                     default=4)
    print("| Split | labelled | no persona | " + " | ".join(f"p{i}" for i in range(n_cols)) + " |")
    print("|---|---:|---:|" + "---:|" * n_cols)
    for k in (k for k in data.SPLITS if k in splits):
        dist = data.label_distribution(splits[k])
        cells = [str(dist["by_index"].get(i, 0)) for i in range(n_cols)]
        share = 100 * dist["labelled"] / max(dist["total"], 1)
        print(f"| {data.SPLIT_TITLES[k]} | {dist['labelled']} ({share:.1f}%) | {dist['by_index'].get(None, 0)} | "
              + " | ".join(cells) + " |")
    for k, ex in info.sources.items():
        dist = data.label_distribution(ex)
        print(f"{Path(info.stats[k].files[0]).name} (all of it): {dist['labelled']} of {dist['total']} "
              f"examples ({100 * dist['labelled'] / max(dist['total'], 1):.1f}%) get a persona label.")


if __name__ == "__main__":
    main()
