"""One training step on SmolLM2-135M-Instruct, CPU: our model + dpo.py vs transformers' LlamaForCausalLM.

    python bench/bench_train.py                 # the whole table (each config in a fresh process)
    python bench/bench_train.py --only sft      # a subset: sft | dpo
    python bench/bench_train.py --one ours sft lora bf16   # one config, prints one JSON line

A step = forward + backward + AdamW update on 8 sequences x 256 tokens (DPO: 4 pairs, chosen + rejected, each
256 tokens, so the policy also sees 2048 tokens; plus the reference forward). The first 64 tokens of each
sequence are the prompt (label -100). Both sides compute the loss the same way: summed log-probs of the target
tokens (dpo.sequence_logps on transformers' full logits; dpo.model_logps(chunked=True), which projects only labelled positions,
on ours), token-mean for SFT, dpo_loss with beta 0.1 for DPO. The DPO reference is the adapter-disabled base
(LoRA) or a frozen copy (full fine-tuning), computed in the step for both. LoRA: r 8, alpha 16 on q/k/v/o and the
MLP, the same LoRALinear wrapped around both models' nn.Linear layers.

Peak memory is the process's ru_maxrss, each config measured in its own fresh process (it includes loading).
Tokens/s: 2048 / (median time of the timed steps), after one warm-up step.
"""
import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dpo  # noqa: E402
import model as modeling  # noqa: E402
from extras.smol import smol_model_dir  # noqa: E402

B, T, PROMPT = 8, 256, 64


def make_batches(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    half = B // 2  # DPO: 4 pairs sharing their prompt
    rej = torch.randint(0, vocab, (half, T), generator=g)
    rej[:, :PROMPT] = ids[:half, :PROMPT]
    rej_labels = rej.clone()
    rej_labels[:, :PROMPT] = -100
    sft = {"input_ids": ids, "labels": labels}
    pref = {"chosen_input_ids": ids[:half], "chosen_labels": labels[:half],
            "rejected_input_ids": rej, "rejected_labels": rej_labels}
    return sft, pref


def wrap_lora_hf(hf):
    """The same LoRA layer (model.LoRALinear) around transformers' q/k/v/o and MLP linears."""
    for p in hf.parameters():
        p.requires_grad_(False)
    for layer in hf.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                setattr(parent, n, modeling.LoRALinear(getattr(parent, n), r=8, alpha=16))


def run_one(impl: str, mode: str, adapt: str, prec: str, steps: int) -> dict:
    path = smol_model_dir()
    torch.manual_seed(0)
    if impl == "ours":
        m = modeling.load_model(path)
        if adapt == "lora":
            modeling.add_lora(m, r=8, alpha=16)
        logps_fn = lambda net, ids, labels: dpo.model_logps(net, ids, labels, chunked=True)  # noqa: E731
    else:
        import transformers  # here only: "ours" rows must not pay transformers' import in their peak memory
        m = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
        if adapt == "lora":
            wrap_lora_hf(m)
        # the loss written the same way: summed target log-probs from the full logits
        logps_fn = lambda net, ids, labels: dpo.sequence_logps(net(ids).logits, labels)  # noqa: E731
    m.eval()  # dropout off (SmolLM2 has none anyway): the same graph for both
    ref = copy.deepcopy(m).requires_grad_(False) if (mode == "dpo" and adapt == "full") else None
    vocab = m.config.vocab_size
    sft, pref = make_batches(vocab)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if prec == "bf16" else contextlib.nullcontext

    def pair_logps(net, batch):
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        lp, _ = logps_fn(net, ids, labels)
        return lp[:B // 2], lp[B // 2:]

    def step():
        with amp():
            if mode == "sft":
                lp, n = logps_fn(m, sft["input_ids"], sft["labels"])
                loss = -lp.sum() / n.sum()
            else:
                with torch.no_grad():
                    if ref is not None:
                        rc, rr = pair_logps(ref, pref)
                    else:
                        with modeling.lora_disabled(m):
                            rc, rr = pair_logps(m, pref)
                pc, pr = pair_logps(m, pref)
                loss = dpo.dpo_loss(pc, pr, rc, rr, 0.1)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first_loss = step()  # warm-up (allocator, autocast weight cache, AdamW state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {"impl": impl, "mode": mode, "adapt": adapt, "prec": prec, "sec_per_step": sec,
            "tokens_per_s": B * T / sec, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load_peak_mib": rss_before, "first_loss": first_loss, "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=4, metavar=("IMPL", "MODE", "ADAPT", "PREC"),
                    help="run one config: ours|hf  sft|dpo  lora|full  fp32|bf16")
    ap.add_argument("--only", nargs="*", default=["sft", "dpo"], help="modes to run")
    ap.add_argument("--adapt", nargs="*", default=["lora", "full"])
    ap.add_argument("--prec", nargs="*", default=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=2, help="timed steps per config (after one warm-up)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, steps=args.steps)))
        return

    rows = []
    for mode in args.only:
        for adapt in args.adapt:
            for prec in args.prec:
                for impl in ("hf", "ours"):
                    cmd = [sys.executable, __file__, "--one", impl, mode, adapt, prec, "--steps", str(args.steps)]
                    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                    if out.returncode != 0:
                        sys.exit(f"bench_train.py: {' '.join(cmd[2:])} failed:\n{out.stderr[-3000:]}")
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print(f"{impl:4s} {mode} {adapt:4s} {prec}: {row['tokens_per_s']:7.1f} tok/s  "
                          f"{row['sec_per_step']:6.2f} s/step  peak {row['peak_mib']:6.0f} MiB", flush=True)
    print()
    print(f"One training step, SmolLM2-135M-Instruct, batch {B} x {T} tokens, CPU ({os.cpu_count()} cores, "
          f"{rows[0]['threads']} threads); peak = ru_maxrss of a fresh process")
    print()
    print("| step | weights | precision | transformers tok/s | ours tok/s | speed-up | transformers peak MiB "
          "| ours peak MiB | memory ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for i in range(0, len(rows), 2):
        hf, ours = rows[i], rows[i + 1]
        print(f"| {ours['mode'].upper()} | {ours['adapt']} | {ours['prec']} | {hf['tokens_per_s']:.0f} | "
              f"{ours['tokens_per_s']:.0f} | {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x | "
              f"{hf['peak_mib']:.0f} | {ours['peak_mib']:.0f} | {ours['peak_mib'] / hf['peak_mib']:.2f} |")
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
