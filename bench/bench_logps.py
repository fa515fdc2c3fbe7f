"""Does the chunked log-prob path pay? dpo.target_logps (labelled rows only, chunk by chunk) vs dpo.sequence_logps
(full (B, T, V) logits, fp32 log-softmax) on one LoRA training step of SmolLM2-135M-Instruct, CPU, fp32.

    python bench/bench_logps.py                  # SFT (8 x 256) and DPO-shaped (16 x 256) steps, both paths
    python bench/bench_logps.py --quick          # a tiny random Llama instead of SmolLM2 (smoke run)
    python bench/bench_logps.py --steps 3 --rounds 2 --threads 2 --batch 8 --seq 256
    python bench/bench_logps.py --model-dir DIR  # another HF-layout Llama directory (default: extras/smol.py's)

The step: load_model(smol dir), add_lora(r 16, alpha 32, dropout 0.05, default targets), train mode, fp32;
  plain:   logps, n = dpo.sequence_logps(model(ids), labels)
  chunked: logps, n = dpo.target_logps(model(ids, hidden_only=True), model.output_weight, labels)
  SFT: loss = -logps.sum() / batch;  DPO: 2*batch rows (chosen then rejected, sharing each prompt),
  loss = mean(-logsigmoid(0.1 * ((pi_c - ref_c) - (pi_r - ref_r)))) with the reference log-probs computed once
  before the timed steps (no grad, chunked path for both: it must not set the plain path's peak).
  Then loss.backward(), grads dropped. No optimizer step: the weights stay the same, so every step is the same work.
A batch like PAL's: each row a prompt of ~200 tokens (labels IGNORE) + a reply of 20-40 labelled tokens; every third
row is shorter (prompt ~120-180) and right-padded to --seq (pad id 2, labels IGNORE).
LoRA B is drawn (std 0.01, seeded) instead of zeros, as after some training: at B = 0 every lora_A gradient is zero
and the gradient check below would compare zeros.

Memory: every (shape, path) runs in its own fresh child process (the parent never imports torch: Linux carries
ru_maxrss over fork+exec, so a big parent would leak its size into the child's number). The child reports
  base = ru_maxrss after loading the model, adding LoRA, reading every weight once (an fp32 load maps the file
         copy-on-write: its pages count once read) and building the batch, before the first step;
  peak = ru_maxrss after 1 warm-up + --steps timed steps;  step increment = peak - base.
  /proc/self/status VmHWM (reset by exec) is checked against ru_maxrss.
Speed: median seconds of the timed steps (forward + loss + backward). Paths alternate order shape by shape and round
by round (plain, chunked | chunked, plain | ...); each number is the median over rounds.
Correctness: one more child runs both paths on the same batch, weights and dropout seed and compares logps
(allclose rtol 1e-4) and every LoRA gradient (max |diff| / max |grad| per tensor).
The load average (os.getloadavg) is printed around each child: other processes on the machine skew the timings.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("plain", "chunked")
BETA = 0.1


# ----------------------------------------------------------------------------------------------------------------------
# Child side (imports torch and the project)

def _project():
    sys.path.insert(0, str(ROOT))
    import torch
    import data
    import dpo
    import model as modeling
    return torch, data, dpo, modeling


def write_tiny_llama(out: Path, seed: int = 0):
    """A small random Llama in Hugging Face layout (config.json + model.safetensors), tied head like SmolLM2."""
    import torch
    from safetensors.torch import save_file
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "vocab_size": 8192,
           "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    g = torch.Generator().manual_seed(seed)
    c, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * hd
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    sd = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], c), "model.norm.weight": torch.ones(c)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": rnd(cfg["num_attention_heads"] * hd, c),
                   p + "self_attn.k_proj.weight": rnd(kv, c), p + "self_attn.v_proj.weight": rnd(kv, c),
                   p + "self_attn.o_proj.weight": rnd(c, cfg["num_attention_heads"] * hd),
                   p + "mlp.gate_proj.weight": rnd(f, c), p + "mlp.up_proj.weight": rnd(f, c),
                   p + "mlp.down_proj.weight": rnd(c, f),
                   p + "input_layernorm.weight": torch.ones(c), p + "post_attention_layernorm.weight": torch.ones(c)})
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg))


def make_batch(rows: int, seq: int, vocab: int, IGNORE: int, dpo_pairs: bool, seed: int = 0):
    """(ids, labels) (R, seq) like PAL's: prompt ~200 tokens (IGNORE) + reply 20-40 labelled tokens, right-padded;
    every third row shorter. DPO: rows = 2 * pairs, chosen rows first, rejected rows after, each pair one prompt."""
    import torch
    g = torch.Generator().manual_seed(seed)
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    tok = lambda n: torch.randint(17, vocab, (n,), generator=g)  # noqa: E731  (ids < 17: special tokens)
    ids = torch.full((rows, seq), 2, dtype=torch.long)  # pad = eos id 2
    labels = torch.full((rows, seq), IGNORE, dtype=torch.long)
    n_prompts = rows // 2 if dpo_pairs else rows
    for i in range(n_prompts):
        short = i % 3 == 2
        prompt = tok(randint(120, 180) if short else randint(190, 215))
        for r in ([i, i + n_prompts] if dpo_pairs else [i]):
            reply = tok(randint(20, 40))
            row = torch.cat([prompt, reply])[:seq]
            p = min(len(prompt), seq)
            ids[r, :len(row)] = row
            labels[r, p:len(row)] = row[p:]
    return ids, labels


def setup(args):
    """Model with LoRA (B drawn), train mode, threads set, every weight read once; and the batch."""
    torch, data, dpo, modeling = _project()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir
    if args.quick:
        import tempfile
        tmp = tempfile.TemporaryDirectory()
        write_tiny_llama(Path(tmp.name))
        model_dir = tmp.name
    m = modeling.load_model(model_dir)
    modeling.add_lora(m, r=16, alpha=32, dropout=0.05, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.requires_grad and not p.any():  # lora_B, zero-initialised
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        touched = sum(float(p.sum()) for p in m.parameters())  # noqa: F841 (fault the mapped weight pages in)
    m.train()
    rows = 2 * args.batch if args.shape == "dpo" else args.batch
    ids, labels = make_batch(rows, args.seq, m.config.vocab_size, data.IGNORE, args.shape == "dpo")
    return torch, dpo, m, ids, labels


def make_step(torch, dpo, m, ids, labels, path: str, shape: str, batch: int):
    def logps_of(which):
        if which == "plain":
            return dpo.sequence_logps(m(ids), labels)[0]
        return dpo.target_logps(m(ids, hidden_only=True), m.output_weight, labels)[0]

    ref = None
    if shape == "dpo":
        with torch.no_grad():
            torch.manual_seed(123)
            ref = logps_of("chunked")

    def step(seed: int = 0):
        torch.manual_seed(seed)  # the same dropout masks for both paths
        lp = logps_of(path)
        if shape == "sft":
            loss = -lp.sum() / batch
        else:
            margin = (lp[:batch] - ref[:batch]) - (lp[batch:] - ref[batch:])
            loss = -torch.nn.functional.logsigmoid(BETA * margin).mean()
        loss.backward()
        return lp.detach(), loss.item()
    return step


def vm_status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child_measure(args) -> dict:
    import resource
    import time
    torch, dpo, m, ids, labels = setup(args)
    step = make_step(torch, dpo, m, ids, labels, args.path, args.shape, args.batch)
    params = [p for p in m.parameters() if p.requires_grad]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_now = vm_status("VmRSS")
    times, losses = [], []
    for i in range(args.steps + 1):  # step 0: warm-up
        t0 = time.perf_counter()
        _, loss = step()
        dt = time.perf_counter() - t0
        for p in params:
            p.grad = None
        losses.append(loss)
        if i:
            times.append(dt)
    return {"path": args.path, "shape": args.shape, "base": base, "base_vmrss": base_now,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "hwm": vm_status("VmHWM"),
            "sec": statistics.median(times), "times": times, "loss": losses[0], "threads": torch.get_num_threads(),
            "labelled": int((labels[:, 1:] != -100).sum()), "tokens": int(labels.numel()), "vocab": m.config.vocab_size}


def child_check(args) -> dict:
    torch, dpo, m, ids, labels = setup(args)
    out = {}
    for path in PATHS:
        step = make_step(torch, dpo, m, ids, labels, path, args.shape, args.batch)
        lp, loss = step(seed=7)
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        for p in m.parameters():
            p.grad = None
        out[path] = (lp, loss, grads)
    (lp_a, loss_a, g_a), (lp_b, loss_b, g_b) = out["plain"], out["chunked"]
    rel = {n: float((g_a[n] - g_b[n]).abs().max() / g_a[n].abs().max().clamp(min=1e-30)) for n in g_a}
    worst = max(rel, key=rel.get)
    total = float(torch.cat([(g_a[n] - g_b[n]).flatten() for n in g_a]).norm()
                  / torch.cat([g_a[n].flatten() for n in g_a]).norm())
    return {"shape": args.shape, "logps_close": bool(torch.allclose(lp_a, lp_b, rtol=1e-4, atol=0)),
            "logps_maxrel": float(((lp_a - lp_b).abs() / lp_a.abs()).max()), "loss": [loss_a, loss_b],
            "grad_tensors": len(rel), "grad_worst_rel": rel[worst], "grad_worst": worst, "grad_norm_rel": total,
            "grads_close": all(torch.allclose(g_a[n], g_b[n], rtol=1e-3, atol=1e-4 * float(g_a[n].abs().max()))
                               for n in g_a)}


# ----------------------------------------------------------------------------------------------------------------------
# Parent side (stdlib only)

def run_child(args, mode: str, shape: str, path: str = "plain") -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--shape", shape, "--path", path, "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads or 0),
           "--model-dir", args.model_dir or ""] + (["--quick"] if args.quick else [])
    load0 = os.getloadavg()[0]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"bench_logps.py: {' '.join(cmd[2:])} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load"] = (load0, os.getloadavg()[0])
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per child (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="children per (shape, path), order alternating")
    ap.add_argument("--batch", type=int, default=8, help="SFT rows; the DPO step has 2x as many")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--shapes", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    ap.add_argument("--quick", action="store_true", help="tiny random Llama instead of SmolLM2")
    ap.add_argument("--no-check", action="store_true", help="skip the logps / gradient equality check")
    ap.add_argument("--child", choices=["measure", "check"], help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="sft", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="plain", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default="", help="a Hugging Face-layout Llama directory (default: the last line "
                    "of `python extras/smol.py`, SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps((child_measure if args.child == "measure" else child_check)(args)))
        return

    if not args.quick and not args.model_dir:
        smol = subprocess.run([sys.executable, str(ROOT / "extras" / "smol.py")], capture_output=True, text=True,
                              cwd=ROOT)
        if smol.returncode != 0:
            sys.exit(f"extras/smol.py failed (try `bash train.sh setup`):\n{smol.stderr[-2000:]}")
        args.model_dir = smol.stdout.strip().splitlines()[-1]
    name = "tiny random Llama (quick)" if args.quick else Path(args.model_dir).name
    print(f"{name}; LoRA r16 a32 dropout 0.05, fp32; {os.cpu_count()} CPUs; load average at start "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    results, checks = {}, {}
    flip = False
    for shape in args.shapes:
        for _ in range(args.rounds):
            for path in (PATHS[::-1] if flip else PATHS):
                row = run_child(args, "measure", shape, path)
                results.setdefault((shape, path), []).append(row)
                print(f"  {shape} {path:7s}: base {row['base'] / 1e6:6.0f} MB  peak {row['peak'] / 1e6:6.0f} MB "
                      f"(VmHWM {row['hwm'] / 1e6:.0f})  {row['sec']:6.2f} s/step {[round(t, 2) for t in row['times']]}"
                      f"  loss {row['loss']:.5f}  load {row['load'][0]:.2f}->{row['load'][1]:.2f}", flush=True)
            flip = not flip
        if not args.no_check:
            checks[shape] = c = run_child(args, "check", shape)
            print(f"  {shape} check: logps allclose(rtol 1e-4) {c['logps_close']} (max rel {c['logps_maxrel']:.1e}); "
                  f"LoRA grads close {c['grads_close']} ({c['grad_tensors']} tensors, worst max|diff|/max|g| "
                  f"{c['grad_worst_rel']:.1e} on {c['grad_worst']}, whole-gradient norm rel {c['grad_norm_rel']:.1e})"
                  f"; loss {c['loss'][0]:.6f} vs {c['loss'][1]:.6f}", flush=True)

    first = next(iter(results.values()))[0]
    print(f"\n{name}, CPU, {first['threads']} threads, vocab {first['vocab']}, {args.steps} timed steps per child after "
          f"1 warm-up, {args.rounds} round(s); load average now {os.getloadavg()[0]:.2f} "
          f"(min/max around children {min(r['load'][0] for v in results.values() for r in v):.2f}/"
          f"{max(r['load'][1] for v in results.values() for r in v):.2f})")
    print()
    print("| step | path | labelled / tokens | peak RSS (MB) | base RSS (MB) | step increment (MB) | s/step |"
          " chunked/plain peak | chunked/plain increment | chunked/plain time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        med = {}
        for path in PATHS:
            rs = results[(shape, path)]
            med[path] = {k: statistics.median(r[k] for r in rs) for k in ("peak", "base", "sec")}
            med[path]["inc"] = statistics.median(r["peak"] - r["base"] for r in rs)
        for path in PATHS:
            r, rows = med[path], results[(shape, path)][0]
            ratios = "| | |" if path == "plain" else (
                f"**{r['peak'] / med['plain']['peak']:.2f}** | **{r['inc'] / med['plain']['inc']:.2f}** | "
                f"**{r['sec'] / med['plain']['sec']:.2f}** |")
            size = f"{args.batch} x {args.seq}" if shape == "sft" else f"{2 * args.batch} x {args.seq}"
            print(f"| {shape.upper()} {size} | {path} | {rows['labelled']} / {rows['tokens']} | {r['peak'] / 1e6:.0f} | "
                  f"{r['base'] / 1e6:.0f} | {r['inc'] / 1e6:.0f} | {r['sec']:.2f} | {ratios}")


if __name__ == "__main__":
    main()
