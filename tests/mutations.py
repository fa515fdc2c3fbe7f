"""Mutation check: does the test suite fail when the method breaks?

Each entry of MUTANTS is one plausible single-line bug on the student's path (a sign, an off-by-one, a swapped
argument, a missing context manager). Every bug is planted alone in a scratch copy of the working tree, the test
files named with it run there, and the bug is *caught* when at least one of them fails. A bug the named tests do not
catch is a hole in the suite: write the test that would have caught it (against an independent reference), then
rerun this check.

    python tests/mutations.py            # every mutant (about 10-20 minutes on 2 CPU cores)
    python tests/mutations.py --list     # names, files and tests, nothing run
    python tests/mutations.py dpo-loss-sign rope-sign   # only these

Run it before a release and after any change to the core's formulas; it is not part of CI (too slow). It exits
non-zero when a bug survives, when a mutant no longer applies (its text is gone from the core: update the entry),
or when the unmutated tests do not pass in the scratch copy to begin with.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the project root
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # the test files expected to catch it
    why: str


MUTANTS = [
    # ---- model.py: the networks --------------------------------------------------------------------------------
    Mutant("rope-sign", "model.py", "torch.cat((-sin, sin), dim=-1)", "torch.cat((sin, -sin), dim=-1)",
           ("tests/test_model.py",), "rotary positions turn the wrong way"),
    Mutant("cached-causal-mask", "model.py", ".tril(diagonal=past)", ".tril(diagonal=past + 1)",
           ("tests/test_model.py",), "each new token also sees the next one"),
    Mutant("kv-positions-restart", "model.py", "torch.arange(past, past + T, device=input_ids.device",
           "torch.arange(0, T, device=input_ids.device", ("tests/test_model_cache_positions.py",),
           "decode steps after the prompt get positions from 0 again"),
    Mutant("gpt2-conv1d-not-transposed", "model.py",
           'return model.family == "gpt2" and GPT2_TRANSPOSED.fullmatch(ours) is not None', "return False",
           ("tests/test_model.py",), "GPT-2's Conv1D weights loaded as if they were nn.Linear's"),
    Mutant("stop-token-ignored", "model.py", "hit = torch.isin(tok, stops) & ~done", "hit = torch.zeros_like(done)",
           ("tests/test_model.py",), "generation runs past the end-of-turn token"),
    Mutant("lora-scale-inverted", "model.py", "self.scale = r, alpha, alpha / r", "self.scale = r, alpha, r / alpha",
           ("tests/test_model_lora_scale.py",), "LoRA scaled by r / alpha instead of alpha / r"),
    Mutant("lora-b-not-zero", "model.py",
           "torch.zeros(base.out_features, r, device=device, dtype=torch.float32)",
           "torch.full((base.out_features, r), 0.01, device=device, dtype=torch.float32)",
           ("tests/test_model.py",), "a fresh adapter changes the model before any training"),
    Mutant("gaussian-init-std", "model.py", "nn.init.normal_(self.lora_A, std=1 / r, generator=generator)",
           "nn.init.normal_(self.lora_A, std=1 / math.sqrt(r), generator=generator)",
           ("tests/test_dpo_lora_authors.py",), "the authors' Gaussian A drawn 4 times too wide at r 16"),
    # ---- data.py: prompts, targets, selection ------------------------------------------------------------------
    Mutant("prompt-target-boundary", "data.py", "[IGNORE] * len(p) + t}", "[IGNORE] * (len(p) + 1) + t[1:]}",
           ("tests/test_data_tokenizers.py", "tests/test_data_persona.py"), "the target's first token is not trained"),
    Mutant("selection-zero-based", "data.py", "personas[k - 1] if 1 <= k <= len(personas)",
           "personas[k] if 0 <= k < len(personas)", ("tests/test_data_persona.py",),
           "the model's 'k' picks sentence k+1"),
    Mutant("target-without-eos", "data.py", "target_ids = target_ids + [tok.eos_id]", "target_ids = target_ids",
           ("tests/test_data_tokenizers.py", "tests/test_data_persona.py"), "the model never learns to stop"),
    # ---- dpo.py: losses and the training loop --------------------------------------------------------------------
    Mutant("logps-shift", "dpo.py", "labels = labels[:, 1:]  # (B, T-1)", "labels = labels[:, :-1]  # (B, T-1)",
           ("tests/test_dpo.py",), "position t scored on its own token, not the next one"),
    Mutant("dpo-loss-sign", "dpo.py", "-F.logsigmoid(beta * (chosen_logratio - rejected_logratio))",
           "-F.logsigmoid(beta * (rejected_logratio - chosen_logratio))", ("tests/test_dpo.py",),
           "DPO prefers the rejected reply"),
    Mutant("reference-with-adapters-on", "dpo.py",
           "    with contextlib.nullcontext() if adapters else lora_disabled(policy):",
           "    with contextlib.nullcontext():", ("tests/test_dpo_reference.py",),
           "the LoRA reference is the policy itself"),
    Mutant("clip-first-group-only", "dpo.py", "[p for g in run.opt.param_groups for p in g[\"params\"]]",
           "run.opt.param_groups[0][\"params\"]", ("tests/test_dpo_lora_authors.py",),
           "with LoRA+ the clip sees A's gradients only (zero at the start) and never clips B"),
    Mutant("lora-plus-ratio-ignored", "dpo.py", '"lr": lr * lora_plus_ratio}', '"lr": lr}',
           ("tests/test_dpo_lora_authors.py",), "the B matrices learn at the plain learning rate"),
    Mutant("grad-accum-divides-twice", "dpo.py", "run.scaler.scale(loss_sum * run.world / norm).backward()",
           "run.scaler.scale(loss_sum * run.world / norm / cfg.grad_accum).backward()",
           ("tests/test_dpo_accumulation.py",), "accumulated gradients grad_accum times too small"),
    Mutant("dpo-dropout-on", "dpo.py", "cfg.dropout if cfg.dropout is not None else not dpo",
           "cfg.dropout if cfg.dropout is not None else True", ("tests/test_dpo_train.py", "tests/test_dpo.py"),
           "DPO trains with dropout on: policy and reference see different networks"),
    Mutant("scheduler-not-resumed", "dpo.py", 'run.sched.load_state_dict(state["scheduler"])', "None",
           ("tests/test_dpo_train.py",), "a resumed run restarts its learning-rate schedule"),
    Mutant("early-stop-keeps-worst", "dpo.py", "score > self.best_score", "score < self.best_score",
           ("tests/test_dpo_train.py",), "the exported 'best' checkpoint is the worst"),
    # ---- nli.py: C.score -----------------------------------------------------------------------------------------
    Mutant("c-score-direction", "nli.py", "C_SCORE_VALUE = (-1, 0, 1)", "C_SCORE_VALUE = (1, 0, -1)",
           ("tests/test_nli_cscore.py",), "contradiction counts as consistency"),
    Mutant("c-score-min", "nli.py", "per_max = [float(max(v))", "per_max = [float(min(v))",
           ("tests/test_nli_cscore.py",), "the worst persona sentence decides, not the best"),
    # ---- pal.py: the pipeline and its metrics --------------------------------------------------------------------
    Mutant("continued-adapters-base-reference", "pal.py", "reference_adapters=continued)",
           "reference_adapters=False)", ("tests/test_pal_lora_handoff.py",),
           "Llama's DPO reference is the base model (the authors' bug), not the SFT model that wrote the pairs"),
    Mutant("gold-persona-at-inference", "pal.py",
           "selected = [data.parse_selection(t, e.personas, lang) for t, e in zip(picks, todo)]",
           "selected = [e.personas[e.persona_label] if e.persona_label is not None else None for e in todo]",
           ("tests/test_pal_wiring.py",), "select-then-generate highlights the gold persona (the authors' bug)"),
    Mutant("pairs-see-personas", "pal.py",
           'data.encode_generation_prompt(tok, e, "history", lang, max_len=room, stats=stats)[0] for e in todo]',
           'data.encode_generation_prompt(tok, e, "personas", lang, max_len=room, stats=stats)[0] for e in todo]',
           ("tests/test_pal.py", "tests/test_pal_wiring.py"), "the rejected replies are not persona-less"),
    Mutant("bleu-arguments-swapped", "pal.py", "bleu = corpus_bleu(hyps, refs, max_n=4, lang=lang)",
           "bleu = corpus_bleu(refs, hyps, max_n=4, lang=lang)", ("tests/test_pal_wiring.py",),
           "BLEU with hypothesis and reference swapped (the authors' bug)"),
]


def scratch_copy(dest: Path):
    """The working tree as git sees it (tracked and untracked, not ignored files) copied to `dest`."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(where: Path, tests, timeout: int) -> tuple[int, str, float]:
    """pytest on `tests` in `where`, stopping at the first failure -> (exit status, output, seconds)."""
    env = dict(os.environ, CI="1", PYTHONDONTWRITEBYTECODE="1")  # CI=1: a skip fails (a skipped test catches nothing)
    env.setdefault("PAL_SHARED", str(ROOT.parent / "shared"))  # ../shared as seen from the real checkout
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=where, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return -1, "timed out", time.perf_counter() - t0


def first_failure(output: str) -> str:
    m = re.search(r"^FAILED (\S+)", output, re.M)
    return m.group(1).split("/")[-1] if m else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="only these mutants (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run (default 1200)")
    args = ap.parse_args(argv)
    known = {m.name: m for m in MUTANTS}
    if unknown := [n for n in args.names if n not in known]:
        print(f"mutations.py: unknown mutant(s) {unknown}; --list shows them", file=sys.stderr)
        return 2
    chosen = [known[n] for n in args.names] if args.names else MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name:28} {m.file:8} {' '.join(m.tests):60} {m.why}")
        return 0

    stale = [m for m in chosen if (ROOT / m.file).read_text().count(m.old) != 1]
    for m in stale:
        print(f"STALE  {m.name}: its text occurs {(ROOT / m.file).read_text().count(m.old)} times in {m.file} "
              f"(expected once): update the entry in tests/mutations.py")
    chosen = [m for m in chosen if m not in stale]
    results = []
    with tempfile.TemporaryDirectory(prefix="pal-mutants-") as tmp:
        work = Path(tmp)
        scratch_copy(work)
        tests = sorted({t for m in chosen for t in m.tests})
        rc, out, secs = run_tests(work, tests, args.timeout)
        print(f"baseline (no bug planted): {'pass' if rc == 0 else 'FAIL'} in {secs:.0f} s, {len(tests)} test files")
        if rc != 0:
            print(out[-3000:])
            print("mutations.py: the tests fail without any bug planted; fix that first", file=sys.stderr)
            return 1
        for m in chosen:
            path = work / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                rc, out, secs = run_tests(work, m.tests, args.timeout)
            finally:
                path.write_text(original)
            # pytest: 1 = tests failed (caught); 0 = all passed (survived); anything else = the run itself broke
            verdict = {0: "SURVIVED", 1: "caught"}.get(rc, "ERROR")
            results.append((m, verdict))
            print(f"{verdict:8} {m.name:28} {secs:6.0f} s  {first_failure(out) if rc == 1 else m.why}", flush=True)
            if verdict == "ERROR":
                print(out[-2000:])
    bad = [m.name for m, v in results if v != "caught"] + [m.name for m in stale]
    print(f"\n{sum(v == 'caught' for _, v in results)} of {len(results) + len(stale)} planted bugs caught"
          + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
