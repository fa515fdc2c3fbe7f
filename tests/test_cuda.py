"""The GPU paths (issue 12), run whenever CUDA is there and skipped (also in CI) where it is not: logits on the GPU
in fp32 / bf16 / fp16 against the CPU in fp32 (padded and not), greedy decoding equal to the CPU's, an SFT step with
fp16 loss scaling, DPO with bf16 LoRA at lr 0 giving ln 2, export -> reload -> the same logits, `torchrun
--nproc_per_node 1` (nccl) of a training stage, and the whole pipeline on a tiny model. The CPU side of each is
checked against transformers in tests/test_model.py; here the GPU is checked against the CPU."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, _args, collate_dpo, collate_sft, dpo_features, sft_features, tiny_gpt2, tiny_llama

import dpo
import model as modeling

pytestmark = [pytest.mark.needs_hardware,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}  # max |logit diff| / max |logit|


def _model(family):
    return tiny_llama() if family == "llama" else tiny_gpt2(dropout=0.0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_logits_match_cpu_fp32_padded_and_unpadded(family, dtype):
    cpu = _model(family).eval()
    gpu = _model(family).eval().to("cuda", dtype)
    long, short = list(range(3, 15)), list(range(20, 27))
    with torch.no_grad():
        ref = [cpu(torch.tensor([s]))[0].float() for s in (long, short)]
        alone = gpu(torch.tensor([long], device="cuda"))[0].float().cpu()
        # a left-padded batch: the short row's real tokens must see the same logits as alone
        pad = len(long) - len(short)
        ids = torch.tensor([long, [0] * pad + short], device="cuda")
        mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)], device="cuda")
        batch = gpu(ids, attention_mask=mask).float().cpu()
    for got, want in ((alone, ref[0]), (batch[0], ref[0]), (batch[1, pad:], ref[1])):
        assert (got - want).abs().max() / want.abs().max() < TOL[dtype]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_on_gpu_equals_cpu(family):
    prompts = [[5, 9, 13, 2], [7, 3]]
    cpu = modeling.generate(_model(family).eval(), prompts, 12)
    gpu = modeling.generate(_model(family).eval().to("cuda"), prompts, 12)
    assert gpu == cpu


def test_sft_with_fp16_loss_scaling_tracks_fp32(tmp_path):
    feats = sft_features(8)
    losses = {}
    for precision in ("fp32", "fp16"):
        cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path / precision), batch_size=4, max_steps=4, lr=1e-3,
                              warmup_steps=0, precision=precision, device="cuda", progress=False, dropout=False)
        dpo.train(tiny_gpt2(dropout=0.0), cfg, feats, collate_sft, export=False)
        losses[precision] = [json.loads(x)["loss"] for x in (tmp_path / precision / "log.jsonl").read_text().split()]
    assert all(math.isfinite(x) for x in losses["fp16"])
    assert losses["fp16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_dpo_with_bf16_lora_at_lr_0_gives_ln2(tmp_path):
    m = tiny_llama().to(torch.bfloat16)
    modeling.add_lora(m, r=4, alpha=8)
    cfg = dpo.TrainConfig(mode="dpo", out_dir=str(tmp_path), batch_size=4, max_steps=1, lr=0.0, warmup_steps=0,
                          precision="bf16", device="cuda", progress=False)
    dpo.train(m, cfg, dpo_features(4), collate_dpo, export=False)
    first = json.loads((tmp_path / "log.jsonl").read_text().split("\n")[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert all(p.dtype == torch.float32 for p in dpo._trainable(m).values())  # adapters stay fp32


def test_export_then_reload_gives_the_same_logits_on_gpu(tmp_path):
    m = tiny_gpt2(dropout=0.0)
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=4, max_steps=2, lr=1e-3, warmup_steps=0,
                          device="cuda", progress=False)
    dpo.train(m, cfg, sft_features(8), collate_sft)
    back = modeling.load_model(tmp_path / "final", device="cuda")
    ids = torch.tensor([list(range(3, 17))], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(back(ids), m.eval()(ids), atol=1e-5, rtol=1e-5)


def _tiny_run_args(tmp_path):
    tok = ROOT.parent / "shared" / "tokenizers" / "gpt2"
    data_dir = ROOT.parent / "shared" / "data" / "personachat"
    if not (tok / "encoder.json").exists() or not data_dir.exists():
        pytest.fail(f"the GPU pipeline tests need ../shared ({tok}, {data_dir})")
    d = tmp_path / "tiny"
    modeling.save_model(modeling.build_model(modeling.GPT2Config(vocab_size=50257, n_positions=512, n_embd=32,
                                                                 n_layer=2, n_head=2)), d)
    os.symlink(tok / "encoder.json", d / "vocab.json")
    os.symlink(tok / "vocab.bpe", d / "merges.txt")
    return _args(tmp_path / "run", d, data_dir)  # the CPU pipeline tests' tiny settings


def test_torchrun_nproc_1_nccl_runs_a_training_stage(tmp_path):
    args = _tiny_run_args(tmp_path)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "pal.py", "sft", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").exists()


def test_the_whole_pipeline_on_a_tiny_model_on_the_gpu(tmp_path):
    import pal
    pal.main(["all", *_tiny_run_args(tmp_path), "--precision", "fp16", "--gen-dtype", "fp16"])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["n"] == 4 and math.isfinite(res["bleu1"])
