"""PAL's real SFT step on a GPU against transformers (+ PEFT) doing the same step, in one run (issue 24).

    python bench/bench_gpu_train.py                     # GPT-2 small and a Llama-3.1-8B-shaped LoRA step, on cuda
    python bench/bench_gpu_train.py --only gpt2         # one shape (gpt2 | llama)
    python bench/bench_gpu_train.py --llama-layers 8    # a shallower Llama (the same widths) on a smaller card
    python bench/bench_gpu_train.py --device cpu --tiny # a smoke run of the script on a CPU (tiny shapes)

The step is PAL's, as `train.sh` runs it: dpo.set_up + dpo.optimizer_step on length-grouped, right-padded batches of
synthetic PAL-like sequences (a prompt of persona + history, labels on the reply only), in each preset's precision:
  gpt2   full fine-tuning, fp32 weights, fp16 autocast with loss scaling, 32 x 4 micro-batches (128 per step)
  llama  LoRA r 16 (alpha 32, dropout 0.05) on q and v, fp32 adapters on a bf16 base, bf16 autocast, 4 x 16
Both take the chunked log-prob path and clip gradients at 1.0. transformers does the same step: the same
batches and micro-batches, autocast, GradScaler, clipping and fused AdamW, its loss the summed target log-probs of
its full logits (dpo.sequence_logps); for Llama, PEFT's LoRA on q_proj and v_proj (fp32 adapters). Random weights.

Rows: the preset's step, then one switch at a time (each against the preset's step in this run):
  fused AdamW off      the for-each AdamW instead (dpo.py uses fused on CUDA)
  LoRA branch in fp32  the adapter's input copied to fp32 before its autocast matmul (the code before issue 24)
  one micro-batch      the same global batch in fewer, larger micro-batches (where memory allows)
  TF32                 an fp32 forward (evaluation, fp32 generation) with TF32 matmuls, against plain fp32
  masked prefill       attention of a left-padded Llama prefill: K/V repeated for the memory-efficient kernel
                       (model.attend) against SDPA's enable_gqa with a mask (the math kernel on CUDA)
MFU = model FLOPs of the real (unpadded) tokens / time / the card's dense bf16 peak (--peak-tflops; known for
H100 / H200 / A100): per token c*N + 12*L*d*len (PaLM's count; N = non-embedding weights, c = 6 for full
fine-tuning, 4 for LoRA, whose frozen weights need no weight gradients), plus the output layer on labelled tokens.
Times: the median of --steps timed steps after two warm-up steps; peak = torch.cuda.max_memory_allocated.
"""
import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import dpo  # noqa: E402
import model as modeling  # noqa: E402
from infra.trainlog import RunningSums  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 / fp16 tensor-core peaks


@dataclasses.dataclass
class Shape:
    name: str
    precision: str  # the preset's autocast
    micro: int  # sequences per micro-batch (the preset's --batch-size)
    accum: int  # micro-batches per step (the preset's --grad-accum)
    lo: int  # sequence lengths uniform in [lo, hi] tokens, the last `reply` of them labelled
    hi: int
    reply: tuple[int, int]
    lora: bool


def pal_like_features(n: int, vocab: int, shape: Shape, seed: int = 0) -> list[dict]:
    """n sequences of PAL-like lengths: a prompt (label -100) and a reply of a few tokens (labelled)."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        t = int(torch.randint(shape.lo, shape.hi + 1, (1,), generator=g))
        r = int(torch.randint(shape.reply[0], shape.reply[1] + 1, (1,), generator=g))
        ids = torch.randint(1, vocab, (t,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (t - r) + ids[t - r:]})
    return feats


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, n: int, device) -> tuple[float, float]:
    """(median seconds of n calls after two warm-up calls, peak GiB allocated during them; nan on a CPU)."""
    for _ in range(2):
        step(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(n):
        sync(device)
        t0 = time.perf_counter()
        step(i + 2)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def build(shape: Shape, args, device, hf: bool):
    """A random model of the shape, in the preset's weight dtype, with the preset's LoRA; ours or transformers'."""
    import transformers
    dtype = torch.bfloat16 if shape.name == "llama" else torch.float32
    if shape.name == "gpt2":
        kw = dict(n_positions=256, n_embd=64, n_layer=2, n_head=4) if args.tiny else {}  # default: GPT-2 small
        cfg = transformers.GPT2Config(**kw) if hf else modeling.GPT2Config(**kw)
    else:
        kw = (dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2) if args.tiny else  # else Llama-3.1-8B's widths
              dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.llama_layers,
                   num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0))
        kw["max_position_embeddings"] = 2048
        cfg = transformers.LlamaConfig(**kw) if hf else modeling.LlamaConfig(**kw)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on the device: an 8B model never exists in fp32
    try:
        with torch.device(device):
            m = (transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa") if hf
                 else modeling.build_model(cfg))
    finally:
        torch.set_default_dtype(default)
    if shape.lora:
        if hf:
            import peft
            m = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                       target_modules=["q_proj", "v_proj"]))
        else:
            modeling.add_lora(m, r=16, alpha=32, dropout=0.05, targets=["q", "v"])
    else:
        m.requires_grad_(True)
    return m.to(device).train()


def flops(feats: list[dict], idx: list[int], m, shape: Shape) -> float:
    """Model FLOPs of one step over its real tokens (PaLM's count; see the module docstring)."""
    c = m.config
    d, layers = (c.n_embd, c.n_layer) if shape.name == "gpt2" else (c.hidden_size, c.num_hidden_layers)
    emb = m.output_weight.numel()
    blocks = m.h if shape.name == "gpt2" else m.layers  # their linear layers' weights (LoRA's own not counted)
    n = sum(mod.weight.numel() for mod in blocks.modules() if isinstance(mod, torch.nn.Linear))
    k = 4 if shape.lora else 6
    total = 0.0
    for i in idx:
        t = len(feats[i]["input_ids"])
        labelled = sum(y != -100 for y in feats[i]["labels"])
        total += k * n * t + 12 * layers * d * t * t + k * emb * labelled
    return total


def pal_step(m, shape: Shape, feats, args, device, micro: int, fused: bool = True):
    """PAL's optimizer step (dpo.set_up + dpo.optimizer_step) as a function of the step number."""
    cfg = dpo.TrainConfig(mode="sft", out_dir=args.out, batch_size=micro, grad_accum=shape.micro * shape.accum // micro,
                          precision=shape.precision, logps="chunked", group_by_length=True, lr=1e-5,
                          warmup_steps=0, device=str(device), progress=False)
    run = dpo.set_up(m, cfg, len(feats), None)
    if not fused:
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, fused=False)
        run = dataclasses.replace(run, opt=opt, sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    lengths = dpo.row_lengths(feats, False)
    collate = lambda fs: data.collate_sft(fs, 0)  # noqa: E731

    def step(i):
        idx = dpo.global_batch_indices(len(feats), run.global_batch, 0, i, lengths)
        dpo.optimizer_step(run, cfg, m, feats, collate, idx, None, None, RunningSums())
    return step


def hf_step(m, shape: Shape, feats, device, micro: int):
    """The same step written for a transformers model: autocast, GradScaler, clipping, fused AdamW."""
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[shape.precision]
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=shape.precision == "fp16")
    lengths = dpo.row_lengths(feats, False)
    gb = shape.micro * shape.accum

    def step(i):
        idx = dpo.global_batch_indices(len(feats), gb, 0, i, lengths)
        for lo in range(0, gb, micro):
            b = data.collate_sft([feats[j] for j in idx[lo:lo + micro]], 0)
            ids, labels = b["input_ids"].to(device), b["labels"].to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = -dpo.sequence_logps(m(input_ids=ids).logits, labels)[0].sum() / gb
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step


def fp32_branch_forward(self, x):  # LoRALinear.forward before issue 24: x copied to fp32 even under autocast
    y = self.base(x)
    low = F.linear(self.dropout(x.float()), self.lora_A)
    return y + (self.scale * F.linear(low, self.lora_B)).to(y.dtype)


def bench_shape(shape: Shape, args, device, peak: float) -> list[tuple]:
    rows = []
    ours = build(shape, args, device, hf=False)
    feats = pal_like_features(shape.micro * shape.accum * 8, ours.config.vocab_size, shape)
    idx = dpo.global_batch_indices(len(feats), shape.micro * shape.accum, 0, 2, dpo.row_lengths(feats, False))
    step_flops = flops(feats, idx, ours, shape)  # the same count for every row (the batches are the same)
    real = sum(len(feats[i]["input_ids"]) for i in idx)

    def row(label, step):
        sec, mem = timed(step, args.steps, device)
        rows.append((shape.name, label, sec, real / sec, step_flops / sec / (peak * 1e12), mem))

    row("ours", pal_step(ours, shape, feats, args, device, shape.micro))
    if device.type == "cuda":
        row("ours, fused AdamW off", pal_step(ours, shape, feats, args, device, shape.micro, fused=False))
    if shape.lora:
        new = modeling.LoRALinear.forward
        modeling.LoRALinear.forward = fp32_branch_forward
        try:
            row("ours, LoRA branch in fp32 (before)", pal_step(ours, shape, feats, args, device, shape.micro))
        finally:
            modeling.LoRALinear.forward = new
    for micro in args.micro.get(shape.name, []):
        try:
            row(f"ours, micro-batches of {micro}", pal_step(ours, shape, feats, args, device, micro))
        except torch.OutOfMemoryError:
            rows.append((shape.name, f"ours, micro-batches of {micro}: out of memory", *[float("nan")] * 4))
            torch.cuda.empty_cache()
    if shape.name == "gpt2":
        rows += tf32_rows(ours, feats, idx, device)
    del ours
    if device.type == "cuda":
        torch.cuda.empty_cache()
    hf = build(shape, args, device, hf=True)
    row("transformers" + (" + PEFT" if shape.lora else ""), hf_step(hf, shape, feats, device, shape.micro))
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def tf32_rows(m, feats, idx, device) -> list[tuple]:
    """An fp32 forward (no autocast) of one micro-batch, plain and with TF32 matmuls."""
    b = data.collate_sft([feats[i] for i in idx[:32]], 0)
    ids = b["input_ids"].to(device)
    out = []
    old = torch.backends.cuda.matmul.allow_tf32
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        with torch.no_grad():
            sec, mem = timed(lambda i: m(ids, hidden_only=True), 5, device)
        out.append(("gpt2", f"fp32 forward, TF32 {'on' if tf32 else 'off'}", sec, ids.numel() / sec, float("nan"),
                    mem))
    torch.backends.cuda.matmul.allow_tf32 = old
    return out


def prefill_rows(args, device) -> list[tuple]:
    """Attention of one left-padded Llama-8B-shaped prefill layer: model.attend (K/V repeated when masked) against
    SDPA with enable_gqa and the same mask."""
    B, H, Hkv, T, D = (4, 4, 2, 32, 16) if args.tiny else (32, 32, 8, 320, 128)
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = torch.float32 if device.type == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(device, dt) for h in (H, Hkv, Hkv))
    valid = torch.arange(T)[None, :] >= torch.randint(0, T // 2, (B, 1), generator=g)  # (B, T) left padding
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    mask = torch.where(allowed, 0.0, torch.finfo(dt).min).to(device, dt)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(modeling.attend(q, k, v, mask, False), ref, atol=1e-2 if dt != torch.float32 else 1e-5)
    out = []
    for label, fn in (("SDPA enable_gqa + mask (before)",
                       lambda i: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)),
                      ("model.attend: K/V repeated (now)", lambda i: modeling.attend(q, k, v, mask, False))):
        with torch.no_grad():
            sec, mem = timed(fn, args.steps, device)
        out.append(("llama prefill attention", label, sec, B * T / sec, float("nan"), mem))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", choices=("gpt2", "llama"), help="one shape (default: both)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (after two warm-up steps)")
    ap.add_argument("--llama-layers", type=int, default=32, help="decoder layers of the Llama shape (8B: 32)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: known cards)")
    ap.add_argument("--precision", choices=("fp16", "bf16", "fp32"),
                    help="GPT-2's autocast (default: the preset's fp16)")
    ap.add_argument("--tiny", action="store_true", help="small shapes, to check the script on a CPU")
    ap.add_argument("--out", default="/tmp/pal-bench-gpu-train", help="dpo.py's out_dir (nothing is saved)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))
    shapes = {"gpt2": Shape("gpt2", "fp16", 32, 4, 120, 400, (5, 30), lora=False),
              "llama": Shape("llama", "bf16", 4, 16, 120, 600, (5, 30), lora=True)}
    args.micro = {"gpt2": [128], "llama": [16]}  # one micro-batch per step (gpt2), 4 (llama)
    if args.tiny:
        shapes = {"gpt2": Shape("gpt2", "fp32" if device.type == "cpu" else "fp16", 4, 2, 20, 60, (3, 8), False),
                  "llama": Shape("llama", "bf16", 2, 2, 20, 60, (3, 8), lora=True)}
        args.micro = {"gpt2": [8], "llama": [4]}
    if args.precision:
        shapes["gpt2"].precision = args.precision
    rows = []
    for key in ([args.only] if args.only else ["gpt2", "llama"]):
        rows += bench_shape(shapes[key], args, device, peak)
    rows += prefill_rows(args, device)
    import transformers
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}; peak {peak} TFLOPS; "
          f"shapes: {', '.join(f'{s.name} {s.micro} x {s.accum} {s.precision}' for s in shapes.values())}")
    # one table, in the layout tools/gpu_check.sh reads: | step | impl | tokens/s | peak GiB | ours / transformers |
    print("| step | impl | tokens/s | peak GiB | ours / transformers |\n|---|---|---:|---:|---:|")
    for shape, label, sec, tps, mfu, mem in rows:
        other = next((r[2] for r in rows if r[0] == shape and r[1].startswith("transformers")), None)
        ratio = f"{other / sec:.2f}x, " if other and label.startswith("ours") else ""
        mfu = f", MFU {mfu:.1%}" if mfu == mfu else ""  # nan (no known peak, or not a training step): left out
        kind = shape if " " in shape else f"{shape} sft"
        print(f"| {kind} | {label} | {tps:,.0f} | {mem:.2f} | {ratio}{sec:.4f} s{mfu} |")


if __name__ == "__main__":
    main()
