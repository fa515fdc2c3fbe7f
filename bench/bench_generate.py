"""Greedy decoding speed of our `generate` against transformers' `generate`, and the memory of `load_model`.

On SmolLM2-135M-Instruct ("smol"), CPU, prompts of 64 random (non-special) tokens, 64 new greedy tokens per row:
  - tokens/s of model.generate vs transformers' generate, batch 1 and 16, fp32 and bf16. Both sides load the same
    directory (`extras.smol.smol_model_dir()`), in the same dtype, with the same torch thread count, in this process.
    Our half-precision rows run with `extras.fast_cpu.enable(model)` (fp32 kernels for bf16 weights on CPU).
    No early stop on either side (stop_ids=[] for ours, eos_token_id=None for transformers), so both decode exactly
    64 tokens a row; their tokens are compared and the share of equal rows is printed.
    tokens/s = batch * 64 / wall time of the whole call (prefill included), median of --repeat runs after a warm-up,
    ours and transformers interleaved run by run.
  - batch-1 decode speed as a fraction of the memory-bandwidth bound: one decode step must read every weight once
    (the tied embedding once, as the output head), so bound = copy bandwidth / weight bytes. Copy bandwidth is
    measured here with a 512 MiB tensor clone, counting bytes read + written. Decode-only speed excludes the
    prefill: 63 / (time of 64 new tokens - time of 1 new token).
  - peak RSS of load_model(dir) in a fresh subprocess: resource.getrusage(RUSAGE_SELF).ru_maxrss after loading,
    and after reading every weight once (an fp32 load maps the file copy-on-write: its pages count once read),
    minus the VmRSS just before (after `import torch, model, safetensors, huggingface_hub`), against the bytes of
    the checkpoint's safetensors files. Measured first, while this process is small: Linux carries ru_maxrss over
    fork+exec, so a child of a big parent would report the parent's size. /proc VmHWM (reset by exec) cross-checks.

    python bench/bench_generate.py [--threads N] [--repeat 3] [--skip-rss]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers  # the benchmark's oracle (bench and tests only)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402
from extras import fast_cpu, smol  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 64, 64


def make_prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(17, vocab, (batch, PROMPT_LEN), generator=g).tolist()  # ids < 17 are special tokens


def timed_pair(fn_a, fn_b, repeat: int) -> tuple[float, object, float, object]:
    """Median wall times of two calls over `repeat` rounds after one warm-up each, and their last results.

    The two are interleaved (a, b, a, b, ...) so that a change in machine load hits both sides alike.
    """
    fn_a(), fn_b()
    ta, tb, out_a, out_b = [], [], None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out_a = fn_a()
        t1 = time.perf_counter()
        out_b = fn_b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(ta), out_a, statistics.median(tb), out_b


def ours_generate(model, prompts, new_tokens):
    return lambda: M.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=[])


def hf_generate(hf_model, prompts, new_tokens):
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def run():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()
    return run


def copy_bandwidth(nbytes: int = 512 << 20, repeat: int = 5) -> float:
    """Bytes moved per second (read + write) by cloning a big tensor: the machine's practical memory bandwidth."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.clone()  # fault the pages of the destination allocator in
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        y = x.clone()
        best = min(best, time.perf_counter() - t0)
        del y
    return 2 * nbytes / best


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter once (a tied embedding doubles as the output head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


RSS_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
import model, safetensors.torch, huggingface_hub
def status(key):  # bytes, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
base = status("VmRSS")
m = model.load_model(sys.argv[3], dtype=getattr(torch, sys.argv[2]))
with torch.no_grad():  # read every weight once: an fp32 load maps the file, its pages count once they are read
    touched = [float(p.sum()) for p in m.parameters()]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
print(json.dumps({"base": base, "peak": peak, "hwm": status("VmHWM"), "after": status("VmRSS")}))
"""


def load_rss(dtype: str, model_dir: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(ROOT), dtype, str(model_dir)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model_dir = smol.smol_model_dir()
    ckpt_bytes = sum(f.stat().st_size for f in M.checkpoint_files(model_dir))
    print(f"model dir {model_dir}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    # RSS first: Linux keeps ru_maxrss across fork+exec, so the child must start from a parent that is still small.
    rss_rows = [] if args.skip_rss else [(d, load_rss(d, model_dir)) for d in args.dtypes]
    bws = [copy_bandwidth()]

    rows, bound_rows = [], []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours = M.load_model(model_dir, dtype=dtype)
        if dtype != torch.float32:
            fast_cpu.enable(ours)   # the CPU speed path for half-precision weights (what model.py did before #10)
        ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        for batch in args.batches:
            prompts = make_prompts(batch, ours.config.vocab_size)
            t_ours, out_ours, t_ref, out_ref = timed_pair(ours_generate(ours, prompts, NEW_TOKENS),
                                                          hf_generate(ref, prompts, NEW_TOKENS), args.repeat)
            assert all(len(r) == NEW_TOKENS for r in out_ours + out_ref), "both sides must decode 64 tokens a row"
            same = sum(a == b for a, b in zip(out_ours, out_ref))
            tps_ours, tps_ref = batch * NEW_TOKENS / t_ours, batch * NEW_TOKENS / t_ref
            rows.append((batch, dtype_name, tps_ours, tps_ref, tps_ours / tps_ref, f"{same}/{batch}"))
            print(f"  batch {batch:2d} {dtype_name:8s}: ours {tps_ours:7.1f} tok/s, transformers {tps_ref:7.1f} "
                  f"tok/s, x{tps_ours / tps_ref:.2f}", flush=True)
            if batch == 1:
                bws.append(copy_bandwidth())  # again next to the decode timing: machine load changes
                prefill_ours, _, prefill_ref, _ = timed_pair(ours_generate(ours, prompts, 1),
                                                             hf_generate(ref, prompts, 1), args.repeat)
                decode_ours = (NEW_TOKENS - 1) / (t_ours - prefill_ours)
                decode_ref = (NEW_TOKENS - 1) / (t_ref - prefill_ref)
                bound_rows.append((dtype_name, weight_bytes(ours), decode_ours, decode_ref))
        del ours, ref

    print(f"\nSmolLM2-135M-Instruct, CPU, {args.threads} threads, prompt {PROMPT_LEN} tokens, {NEW_TOKENS} new "
          f"greedy tokens, no early stop, median of {args.repeat}")
    print("| batch | dtype | ours tok/s | transformers tok/s | ours / transformers | rows equal |")
    print("|---:|---|---:|---:|---:|---:|")
    for b, d, o, r, x, s in rows:
        print(f"| {b} | {d} | {o:.1f} | {r:.1f} | **{x:.2f}x** | {s} |")
    bw = max(bws)  # the best copy rate seen in this run: the least disturbed by other processes
    print(f"\nBatch-1 decode (prefill excluded) vs the memory-bandwidth bound ({bw / 1e9:.2f} GB/s copy bandwidth, "
          f"best of {[round(b / 1e9, 2) for b in bws]} GB/s measured in this run)")
    print("| dtype | weight bytes/token | bound tok/s | ours decode tok/s | ours / bound | transformers decode tok/s |"
          " transformers / bound |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d, wb, o, r in bound_rows:
        bound = bw / wb
        print(f"| {d} | {wb / 1e6:.0f} MB | {bound:.1f} | {o:.1f} | {o / bound:.0%} | {r:.1f} | {r / bound:.0%} |")

    if rss_rows:
        print(f"\nPeak RSS of load_model(dir) in a fresh process (ru_maxrss after loading - VmRSS before it, "
              f"after `import torch, model`), checkpoint {ckpt_bytes / 1e6:.0f} MB")
        print("| dtype | RSS before | peak RSS (ru_maxrss) | peak - before | / checkpoint bytes | VmHWM check |")
        print("|---|---:|---:|---:|---:|---:|")
        for dtype_name, r in rss_rows:
            grow = r["peak"] - r["base"]
            print(f"| {dtype_name} | {r['base'] / 1e6:.0f} MB | {r['peak'] / 1e6:.0f} MB | {grow / 1e6:.0f} MB | "
                  f"**{grow / ckpt_bytes:.2f}x** | {(r['hwm'] - r['base']) / ckpt_bytes:.2f}x |")

if __name__ == "__main__":
    main()
