"""GPU training and generation throughput: our GPT-2 + dpo.py against transformers' GPT2LMHeadModel, same weights,
same step, in one run (issue 12).

    python bench/bench_gpu_train.py                    # GPT-2 small shape (124M, random weights) on cuda
    python bench/bench_gpu_train.py --precision fp16   # autocast dtype (default bf16; fp32 weights either way)
    python bench/bench_gpu_train.py --device cpu --tiny   # a smoke run of the script itself on a CPU

An SFT step = forward + backward + AdamW update on 16 sequences x 512 tokens (the first 128 are the prompt,
label -100); a DPO step = 8 pairs (chosen + rejected, 16 sequences x 512) against a frozen reference copy,
computed in the step. Both sides compute the loss the same way (dpo.sequence_logps on transformers' full logits,
dpo.model_logps(chunked=True) on ours, which projects only labelled positions). Generation: greedy, 64 prompts x 128 tokens,
48 new tokens each (no stop token, so both sides decode the same count). Tokens/s over the median timed step after
two warm-up steps; peak memory = torch.cuda.max_memory_allocated over that configuration alone.
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dpo  # noqa: E402
import model as modeling  # noqa: E402


def batches(vocab: int, b: int, t: int, prompt: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    half = b // 2
    pref = {"chosen_input_ids": ids[:half], "chosen_labels": labels[:half],
            "rejected_input_ids": ids[half:].clone(), "rejected_labels": labels[half:].clone()}
    pref["rejected_input_ids"][:, :prompt] = ids[:half, :prompt]  # a pair shares its prompt
    return {"input_ids": ids.to(device), "labels": labels.to(device)}, {k: v.to(device) for k, v in pref.items()}


def logps_of(net, ours: bool):
    """(input_ids, labels) -> summed target log-probs (B,), the same function for both implementations."""
    if ours:
        return lambda ids, labels: dpo.model_logps(net, ids, labels, chunked=True)[0]
    return lambda ids, labels: dpo.sequence_logps(net(ids).logits, labels)[0]


def timed(step, n: int, device) -> tuple[float, float]:
    """(median seconds of n timed calls after two warm-up calls, peak GiB allocated during them)."""
    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def train_step(net, logps, kind: str, batch, ref_logps, amp, opt, device):
    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if kind == "sft":
                loss = -logps(batch["input_ids"], batch["labels"]).sum() / (batch["labels"] != -100).sum()
            else:
                pc = logps(batch["chosen_input_ids"], batch["chosen_labels"])
                pr = logps(batch["rejected_input_ids"], batch["rejected_labels"])
                with torch.no_grad():
                    rc = ref_logps(batch["chosen_input_ids"], batch["chosen_labels"])
                    rr = ref_logps(batch["rejected_input_ids"], batch["rejected_labels"])
                loss = dpo.dpo_loss(pc, pr, rc, rr, 0.1)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    cfg = (modeling.GPT2Config(n_positions=256, n_embd=64, n_layer=2, n_head=4) if args.tiny
           else modeling.GPT2Config())  # GPT-2 small: 12 layers, 768 wide, 1024 positions
    b, t, prompt, gen_b, gen_t, new = (4, 64, 16, 8, 32, 8) if args.tiny else (16, 512, 128, 64, 128, 48)
    import transformers  # the reference implementation: a benchmark-only dependency
    torch.manual_seed(0)
    ours = modeling.build_model(cfg)
    with tempfile.TemporaryDirectory() as d:  # the same weights for both, through the Hugging Face layout
        modeling.save_model(ours, d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
    sft, pref = batches(cfg.vocab_size, b, t, prompt, device)
    rows = []
    for name, net, is_ours in (("ours", ours, True), ("transformers", hf, False)):
        net.to(device).train(False)  # dropout off: the same computation on both sides
        ref = copy.deepcopy(net).requires_grad_(False)
        for kind, batch in (("sft", sft), ("dpo", pref)):
            opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
            sec, peak = timed(train_step(net, logps_of(net, is_ours), kind, batch, logps_of(ref, is_ours), amp, opt,
                                         device),
                              args.steps, device)
            rows.append((kind, name, b * t / sec, peak))
            del opt
        del ref
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, cfg.vocab_size, (gen_b, gen_t), generator=g)
        gen_dtype = amp or torch.float32
        net.to(gen_dtype)
        with torch.no_grad():
            if is_ours:
                run = lambda: modeling.generate(net, prompts.tolist(), new)  # noqa: E731
            else:
                ids, mask = prompts.to(device), torch.ones_like(prompts, device=device)
                run = lambda: net.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,  # noqa
                                           do_sample=False, pad_token_id=0)
            sec, peak = timed(run, max(2, args.steps // 3), device)
        rows.append(("generate", name, gen_b * new / sec, peak))
        net.to("cpu", torch.float32)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}, autocast {args.precision}")
    print("| step | impl | tokens/s | peak GiB | ours / transformers |\n|---|---|---:|---:|---:|")
    for kind, impl, tps, peak in rows:
        other = next(r[2] for r in rows if r[0] == kind and r[1] != impl)
        ratio = f"{tps / other:.2f}" if impl == "ours" else ""
        print(f"| {kind} | {impl} | {tps:,.0f} | {peak:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
