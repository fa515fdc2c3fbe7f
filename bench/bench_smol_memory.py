"""Peak memory of the smol preset's SFT step on a CPU: ours against transformers + PEFT, 8 sequences per step taken
in one micro-batch of 8 or in 8 micro-batches of 1 with gradient accumulation (issue 24).

    python bench/bench_smol_memory.py                 # the table: both implementations, micro-batches of 8 and 1
    python bench/bench_smol_memory.py --one ours 1    # one config in this process, one JSON line

The step is the smol preset's: SmolLM2-135M-Instruct in fp32, LoRA r 16 (alpha 32, dropout 0.05) on q, k, v, o and
the MLP, 8 sequences of up to 256 tokens (lengths uniform in 120..256, the last 5..30 tokens labelled, right-padded
to the longest of the micro-batch), summed target log-probs averaged over the 8 sequences, AdamW. Ours: dpo.py's
chunked log-probs (the preset's --logps chunked); transformers: dpo.sequence_logps on its full logits, PEFT's LoRA.
Peak = the process's ru_maxrss (it includes loading the model), each config in a fresh process; time = the median of
--steps steps after one warm-up step.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import dpo  # noqa: E402
import model as modeling  # noqa: E402
from extras.smol import smol_model_dir  # noqa: E402

N = 8  # sequences per optimizer step (the preset's global batch)
TARGETS = ["q", "k", "v", "o", "mlp"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def features(vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    feats = []
    for _ in range(N):
        t, r = int(torch.randint(120, 257, (1,), generator=g)), int(torch.randint(5, 31, (1,), generator=g))
        ids = torch.randint(1, vocab, (t,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (t - r) + ids[t - r:]})
    return sorted(feats, key=lambda f: len(f["input_ids"]))  # a length-grouped step, as the preset batches them


def run_one(impl: str, micro: int, steps: int) -> dict:
    torch.manual_seed(0)
    if impl == "ours":
        m = modeling.load_model(smol_model_dir())
        modeling.add_lora(m, r=16, alpha=32, dropout=0.05, targets=TARGETS)
        logps = lambda ids, labels: dpo.model_logps(m, ids, labels, chunked=True)[0]  # noqa: E731
    else:
        import peft  # here only: "ours" must not pay these imports in its peak memory
        import transformers
        m = transformers.AutoModelForCausalLM.from_pretrained(smol_model_dir(), dtype=torch.float32)
        m = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=HF_TARGETS))
        logps = lambda ids, labels: dpo.sequence_logps(m(input_ids=ids).logits, labels)[0]  # noqa: E731
    m.train()
    feats = features(m.config.vocab_size)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        total = 0.0
        for lo in range(0, N, micro):
            b = data.collate_sft(feats[lo:lo + micro], 0)
            loss = -logps(b["input_ids"], b["labels"]).sum() / N
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    loss = step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "micro": micro, "first_loss": loss, "sec_per_step": statistics.median(times),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "MICRO"), help="one config: ours|hf, sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=1, help="timed steps (after one warm-up step)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.steps)))
        return
    rows = []
    for micro in (N, 1):
        for impl in ("hf", "ours"):
            cmd = [sys.executable, __file__, "--one", impl, str(micro), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                sys.exit(f"bench_smol_memory.py: {impl} {micro} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"\nThe smol preset's SFT step ({N} sequences, LoRA r 16 on q, k, v, o, MLP, fp32), CPU, "
          f"{torch.get_num_threads()} threads; peak = ru_maxrss of a fresh process\n")
    print("| micro-batches | transformers + PEFT peak GiB | ours peak GiB | ours / theirs | transformers s/step "
          "| ours s/step | first loss (theirs, ours) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for i in range(0, len(rows), 2):
        hf, ours = rows[i], rows[i + 1]
        print(f"| {N // ours['micro']} x {ours['micro']} | {hf['peak_gib']:.2f} | {ours['peak_gib']:.2f} | "
              f"{ours['peak_gib'] / hf['peak_gib']:.2f} | {hf['sec_per_step']:.1f} | {ours['sec_per_step']:.1f} | "
              f"{hf['first_loss']:.3f}, {ours['first_loss']:.3f} |")


if __name__ == "__main__":
    main()
