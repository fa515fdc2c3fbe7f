"""The GPU paths (issues 12 and 24), run whenever CUDA is there and skipped (also in CI) where it is not. Against
the CPU in fp32: logits on the GPU in fp32 / bf16 / fp16 (padded and not), greedy decoding in fp32 (equal) and in
half precision (each chosen token near the CPU's best); fp16 loss scaling with its skipped steps counted; DPO with
bf16 LoRA at lr 0 giving ln 2; export -> reload; resume on the GPU; the llama preset in miniature (fp32 adapters on a
bf16 base, end to end); torchrun with nccl (1 process; 2 where there are 2 GPUs); the gpt2 preset's precisions end
to end. Everything is built here: tiny random models, a byte-level tokenizer, the repo's samples/ dialogues.

PAL_CUDA_TESTS_DEVICE=cpu runs the same tests on the CPU (fp16 training skipped: it needs a GPU). That checks the
tests themselves on a machine without a GPU, not CUDA."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, _args, collate_dpo, collate_sft, dpo_features, log_records, sft_features, tiny_gpt2, \
    tiny_llama

import dpo
import model as modeling

DEV = os.environ.get("PAL_CUDA_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.needs_hardware,
              pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}  # max |logit diff| / max |logit|
needs_fp16_training = pytest.mark.skipif(DEV != "cuda", reason="fp16 loss scaling needs a GPU")


def _model(family):
    return tiny_llama() if family == "llama" else tiny_gpt2(dropout=0.0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_logits_match_cpu_fp32_padded_and_unpadded(family, dtype):
    cpu = _model(family).eval()
    gpu = _model(family).eval().to(DEV, dtype)
    long, short = list(range(3, 15)), list(range(20, 27))
    with torch.no_grad():
        ref = [cpu(torch.tensor([s]))[0].float() for s in (long, short)]
        alone = gpu(torch.tensor([long], device=DEV))[0].float().cpu()
        # a left-padded batch: the short row's real tokens must see the same logits as alone, so its positions
        # count from its first real token (as generate() does); a mask alone would shift them by the padding
        pad = len(long) - len(short)
        ids = torch.tensor([long, [0] * pad + short], device=DEV)
        mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)], device=DEV)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = gpu(ids, attention_mask=mask, position_ids=pos).float().cpu()
    for got, want in ((alone, ref[0]), (batch[0], ref[0]), (batch[1, pad:], ref[1])):
        assert (got - want).abs().max() / want.abs().max() < TOL[dtype]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_on_gpu_equals_cpu(family):
    prompts = [[5, 9, 13, 2], [7, 3]]
    cpu = modeling.generate(_model(family).eval(), prompts, 12)
    gpu = modeling.generate(_model(family).eval().to(DEV), prompts, 12)
    assert gpu == cpu


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generation_follows_the_cpu(family, dtype):
    """Greedy decoding in bf16 / fp16 weights (the presets' --gen-dtype) may pick another token where two are
    nearly tied, so it is checked token by token: the CPU in fp32, fed the same prefix, rates each chosen token
    within the dtype's tolerance of its best one."""
    prompts = [[5, 9, 13, 2, 40, 41], [7, 3], [11, 12, 13, 14]]
    cpu = _model(family).eval()
    new = modeling.generate(_model(family).eval().to(DEV, dtype), prompts, 10)
    assert all(len(r) == 10 for r in new)
    with torch.no_grad():
        for p, r in zip(prompts, new):
            logits = cpu(torch.tensor([p + r]))[0, len(p) - 1:-1]  # (10, V): what predicts each new token
            chosen = logits.gather(1, torch.tensor(r)[:, None]).squeeze(1)
            gap = logits.max(-1).values - chosen  # 0 where the GPU picked the CPU's token
            assert (gap / logits.abs().max()).max() < TOL[dtype], (p, r, gap)


@needs_fp16_training
def test_sft_with_fp16_loss_scaling_tracks_fp32(tmp_path):
    """Every step sees the same 4 sequences, so a step the loss scaler skips (inf gradients: GradScaler starts at a
    scale of 65536 and halves it) leaves the model as it was: the fp16 run's loss after u applied updates is the fp32
    run's loss after u updates. The log counts the skipped steps."""
    feats, records = sft_features(4), {}
    for precision, steps in (("fp32", 6), ("fp16", 12)):
        cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path / precision), batch_size=4, max_steps=steps, lr=1e-3,
                              warmup_steps=0, precision=precision, device=DEV, progress=False, dropout=False)
        dpo.train(tiny_gpt2(dropout=0.0), cfg, feats, collate_sft, export=False)
        records[precision] = log_records(tmp_path / precision)
    fp32, fp16 = [r["loss"] for r in records["fp32"]], records["fp16"]
    assert "skipped_steps" not in records["fp32"][0]
    assert all(math.isfinite(r["loss"]) for r in fp16)
    applied = 0  # updates done before each fp16 step
    for r in fp16:
        if applied < len(fp32):
            assert r["loss"] == pytest.approx(fp32[applied], rel=2e-2)
        applied += 1 - r["skipped_steps"]
    assert applied >= 3  # the scaler skips the first steps (overflow at its initial scale), then finds its level


def test_dpo_with_bf16_lora_at_lr_0_gives_ln2(tmp_path):
    m = tiny_llama().to(torch.bfloat16)
    modeling.add_lora(m, r=4, alpha=8)
    cfg = dpo.TrainConfig(mode="dpo", out_dir=str(tmp_path), batch_size=4, max_steps=1, lr=0.0, warmup_steps=0,
                          precision="bf16", device=DEV, progress=False)
    dpo.train(m, cfg, dpo_features(4), collate_dpo, export=False)
    first = log_records(tmp_path)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert all(p.dtype == torch.float32 for p in dpo._trainable(m).values())  # adapters stay fp32


def test_export_then_reload_gives_the_same_logits_on_gpu(tmp_path):
    m = tiny_gpt2(dropout=0.0)
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=4, max_steps=2, lr=1e-3, warmup_steps=0,
                          device=DEV, progress=False)
    dpo.train(m, cfg, sft_features(8), collate_sft)
    back = modeling.load_model(tmp_path / "final", device=DEV)
    ids = torch.tensor([list(range(3, 17))], device=DEV)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m.eval()(ids), atol=1e-5, rtol=1e-5)


def test_resume_on_the_gpu_continues_the_run(tmp_path):
    """Killed after step 3 and resumed: the same steps on the same batches, with dropout on (its random stream is
    restored). CUDA's atomics (index_add, scatter_add, attention backward) add in no fixed order, so the numbers
    agree within float tolerance there, not bit for bit (on the CPU they are equal)."""
    def run(out, stop_at=None, resume=False):
        cfg = dpo.TrainConfig(mode="sft", out_dir=str(out), batch_size=2, max_steps=6, stop_at=stop_at, lr=1e-3,
                              warmup_steps=2, device=DEV, progress=False, resume=resume, save_every=3)
        m = tiny_gpt2(dropout=0.1)
        dpo.train(m, cfg, sft_features(12), collate_sft, export=False)
        return m
    whole = run(tmp_path / "whole")
    run(tmp_path / "split", stop_at=3)
    resumed = run(tmp_path / "split", resume=True)
    a, b = log_records(tmp_path / "whole"), log_records(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    for (n, p), q in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=n)


# ---- the pipeline on tiny models: a byte-level tokenizer written here and the repo's samples/ dialogues --------

def _byte_tokenizer(d):
    """GPT-2's byte-level BPE with no merges: one token per byte, then <|endoftext|>. Returns the vocabulary size."""
    from infra.tokfiles import byte_to_unicode  # GPT-2's printable stand-in of each byte
    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    vocab["<|endoftext|>"] = 256
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def _tiny_run_args(tmp_path, family="gpt2", *extra):
    """pal.py options for a tiny random model of `family` with the byte tokenizer, on samples/ (no ../shared)."""
    d = tmp_path / f"tiny-{family}"
    d.mkdir()
    n = _byte_tokenizer(d)
    torch.manual_seed(0)
    cfg = (modeling.GPT2Config(vocab_size=n, n_positions=1024, n_embd=32, n_layer=2, n_head=2, embd_pdrop=0.0,
                               attn_pdrop=0.0, resid_pdrop=0.0) if family == "gpt2"  # no dropout: ranks agree
           else modeling.LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                     eos_token_id=256))
    modeling.save_model(modeling.build_model(cfg), d)
    # one token per byte: prompts of up to ~500 tokens
    return _args(tmp_path / "run", d, ROOT / "samples", "--max-len", "1024", *extra)


def _torchrun(nproc, args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "pal.py", "sft", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_torchrun_nproc_1_nccl_runs_a_training_stage(tmp_path):
    p = _torchrun(1, _tiny_run_args(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").exists()


@pytest.mark.skipif(DEV == "cuda" and torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: 2 GPUs")
def test_torchrun_two_ranks_nccl_train_as_one_process(tmp_path):
    """2 ranks x batch 1 take the steps of 1 process x batch 2: the same logged losses."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    args = _tiny_run_args(one, "gpt2", "--batch-size", "2")
    from pal import main
    main(["sft", *args])
    p = _torchrun(2, _tiny_run_args(two, "gpt2", "--batch-size", "1", "--grad-accum", "1"))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = ([r for log in sorted((d / "run" / "sft").rglob("log.jsonl")) for r in log_records(log.parent)
             if "loss" in r] for d in (one, two))  # the training records of every SFT phase's log
    assert a and [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-3)


def test_the_llama_preset_in_miniature_on_the_gpu(tmp_path):
    """The llama preset's precisions end to end: a bf16 base, LoRA on q and v with fp32 adapters, bf16 autocast,
    bf16 generation; the exported adapters are fp32 and trained."""
    import pal
    from safetensors.torch import load_file
    pal.main(["all", *_tiny_run_args(tmp_path, "llama"), "--dtype", "bf16", "--precision", "bf16",
              "--gen-dtype", "bf16", "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q,v",
              "--sft-lr", "1e-3", "--dpo-lr", "1e-3"])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["n"] >= 1 and math.isfinite(res["bleu1"])
    for stage in ("sft", "dpo"):
        adapters = load_file(str(tmp_path / "run" / stage / "final" / "adapter.safetensors"))
        assert adapters and all(t.dtype == torch.float32 for t in adapters.values())
        assert any("lora_B" in k and t.abs().max() > 0 for k, t in adapters.items())  # B starts at 0: it trained
    logs = [log.parent for log in (tmp_path / "run").rglob("log.jsonl")]  # every SFT phase's and DPO's
    assert logs and all(math.isfinite(r["loss"]) for d in logs for r in log_records(d) if "loss" in r)


def test_the_whole_pipeline_on_a_tiny_model_on_the_gpu(tmp_path):
    """The gpt2 preset's precisions end to end: fp32 weights, fp16 autocast with loss scaling, fp16 generation."""
    import pal
    precision = "fp16" if DEV == "cuda" else "fp32"  # loss scaling needs a GPU
    pal.main(["all", *_tiny_run_args(tmp_path), "--precision", precision, "--gen-dtype", "fp16"])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["n"] >= 1 and math.isfinite(res["bleu1"])
