"""LoRA as the paper's authors ran it (issue 21; github kylokano/PAL): A drawn from N(0, 1/r^2) (train_lora.py,
PEFT's init_lora_weights="gaussian"), PEFT's default targets (GPT-2: c_attn; Llama: q_proj, v_proj), the LoRA+
optimizer with the B matrices at 16 x lr (trainers.py, peft.optimizers.create_loraplus_optimizer), gradient clip
10. PEFT is the oracle for the init, the targets and the parameter groups; a toy Adam run of the presets' DPO
schedule shows how much further the authors' set-up moves W than the former one (bench/bench_lora_displacement.py
prints the same numbers on the full shapes)."""
import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import hf_gpt2, hf_llama, tiny_llama

import dpo
import model as modeling
import pal

peft = pytest.importorskip("peft")


def lora_a(model) -> torch.Tensor:
    return torch.cat([m.lora_A.detach().flatten() for m in modeling.lora_layers(model).values()])


def test_gaussian_init_draws_A_with_std_1_over_r_as_peft_does_and_B_zero():
    r = 16
    base = nn.Linear(512, 384)
    ours = modeling.LoRALinear(base, r=r, alpha=32, generator=torch.Generator().manual_seed(0), init="gaussian")
    a = ours.lora_A.detach().flatten()  # 16 x 512 = 8192 draws: the std's relative standard error is 1/sqrt(2n)
    n = a.numel()
    assert a.std().item() == pytest.approx(1 / r, rel=6 / math.sqrt(2 * n))  # six standard errors (6.6%)
    assert abs(a.mean().item()) < 6 * (1 / r) / math.sqrt(n)
    assert torch.count_nonzero(ours.lora_B) == 0 and ours.lora_B.shape == (384, r)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(512, 384)

    torch.manual_seed(1)
    theirs = peft.get_peft_model(One(), peft.LoraConfig(r=r, lora_alpha=32, init_lora_weights="gaussian",
                                                        target_modules=["proj"]))
    pa = theirs.base_model.model.proj.lora_A["default"].weight.detach().flatten()
    pb = theirs.base_model.model.proj.lora_B["default"].weight
    assert pa.shape == a.shape and torch.count_nonzero(pb) == 0
    # the same distribution: equal standard deviations within both samples' errors, and matching quartiles
    assert a.std().item() == pytest.approx(pa.std().item(), rel=8 / math.sqrt(n))
    q = torch.tensor([0.25, 0.5, 0.75])
    assert torch.allclose(torch.quantile(a, q), torch.quantile(pa, q), atol=6 * 1.36 * (1 / r) / math.sqrt(n))


def test_kaiming_stays_the_default_and_a_seed_fixes_either_init():
    base = nn.Linear(256, 64)
    kaiming = modeling.LoRALinear(base, r=8, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(256)  # nn.Linear's weight init: uniform(-1/sqrt(in), 1/sqrt(in))
    assert kaiming.lora_A.abs().max().item() <= bound
    assert kaiming.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    for init in modeling.LORA_INITS:
        runs = []
        for noise in (0, 1):
            torch.manual_seed(noise)  # the global stream differs; the adapters' own generator does not
            m = tiny_llama()
            modeling.add_lora(m, r=4, alpha=8, targets=("q", "v"), seed=7, init=init)
            runs.append(lora_a(m))
        assert torch.equal(runs[0], runs[1]), init
    with pytest.raises(ValueError, match="init"):
        modeling.LoRALinear(base, r=8, init="xavier")


@pytest.mark.parametrize("family, targets", [("gpt2", ("q", "k", "v")), ("llama", ("q", "v"))])
def test_the_presets_targets_wrap_the_modules_peft_wraps_by_default(tmp_path, family, targets):
    """The GPU presets' --lora-targets (q,k,v for GPT-2, whose q, k and v are one matrix; q,v for Llama) wrap exactly
    the layers PEFT's LoraConfig wraps when given no target_modules, as the authors' train_lora.py gives none."""
    hf = (hf_gpt2 if family == "gpt2" else hf_llama)(tmp_path)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, init_lora_weights="gaussian"))
    wrapped_peft = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours = modeling.load_model(tmp_path)
    names = modeling.add_lora(ours, r=16, alpha=32, targets=targets, init="gaussian")
    wrapped_ours = {modeling.hf_name(ours, f"{n}.weight").removesuffix(".weight") for n in names}
    assert wrapped_ours == wrapped_peft and len(wrapped_ours) == 2 * (1 if family == "gpt2" else 2)
    # r and the shapes of A and B agree too
    shapes_peft = sorted(tuple(p.shape) for n, p in theirs.named_parameters() if "lora_" in n)
    assert sorted(tuple(p.shape) for n, p in ours.named_parameters() if "lora_" in n) == shapes_peft


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_plus_groups_B_at_ratio_times_lr_as_peft_does(tmp_path, family):
    lr, ratio = 1e-6, 16.0
    hf = (hf_gpt2 if family == "gpt2" else hf_llama)(tmp_path)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, init_lora_weights="gaussian"))
    from peft.optimizers import create_loraplus_optimizer
    opt = create_loraplus_optimizer(model=theirs, optimizer_cls=torch.optim.Adam, lr=lr, loraplus_lr_ratio=ratio)
    expected = sorted((g["lr"], tuple(p.shape)) for g in opt.param_groups for p in g["params"])
    ours = modeling.load_model(tmp_path)
    modeling.add_lora(ours, r=16, alpha=32, targets=("q", "k", "v") if family == "gpt2" else ("q", "v"))
    groups = dpo.param_groups(ours, lr, ratio)
    assert sorted((g["lr"], tuple(p.shape)) for g in groups for p in g["params"]) == expected
    by_id = {id(p): n for n, p in ours.named_parameters()}
    kinds = [sorted({by_id[id(p)].rsplit(".", 1)[1] for p in g["params"]}) for g in groups]
    assert kinds == [["lora_A"], ["lora_B"]]
    assert [g["lr"] for g in groups] == [lr, lr * ratio]
    # ratio 1: one group holding every trainable parameter (the optimizer, and checkpoints, as before LoRA+)
    (one,) = dpo.param_groups(ours, lr, 1.0)
    assert len(one["params"]) == sum(p.requires_grad for p in ours.parameters()) and one["lr"] == lr


def test_training_uses_the_groups_and_clips_one_norm_over_all_of_them(tmp_path):
    """A LoRA run's first step: B = 0, so every gradient of A is zero and the whole norm is B's (the second group).
    A clip computed over the first group alone would see 0 and let B's gradient through unclipped."""
    from conftest import collate_sft, sft_features
    m = tiny_llama()
    modeling.add_lora(m, r=4, alpha=8, targets=("q", "v"), seed=0, init="gaussian")
    cfg = dpo.TrainConfig(mode="sft", out_dir=str(tmp_path), batch_size=4, max_steps=1, lr=1e-3, warmup_steps=0,
                          lora_plus_ratio=16, grad_clip=0.5, progress=False, log_every=1)
    run = dpo.set_up(m, cfg, 8, None)
    assert [g["lr"] for g in run.opt.param_groups] == [1e-3, 1.6e-2]
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    dpo.train(m, cfg, sft_features(8), collate_sft, export=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[0]["grad_norm"] > 0.5  # the norm before clipping, of B's gradients
    # AdamW's first step moves every entry with a gradient by lr (its update is g / |g|): B by 16 x lr
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in m.named_parameters() if p.requires_grad}
    assert all(v == pytest.approx(1.6e-2, rel=1e-3) for n, v in moved.items() if n.endswith("lora_B"))
    assert all(v == 0 for n, v in moved.items() if n.endswith("lora_A"))


def test_bad_lora_settings_are_refused_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match="lora_plus_ratio"):
        dpo.TrainConfig(lora_plus_ratio=0)
    with pytest.raises(ValueError, match="reference_adapters"):
        dpo.TrainConfig(mode="dpo", reference="live", reference_adapters=True)
    for over, match in [({"lora_plus_ratio": 0.0}, "--lora-plus-ratio"), ({"grad_clip": -1.0}, "--grad-clip"),
                        ({"lora_init": "xavier"}, "--lora-init"), ({"dpo_adapters": "merge"}, "--dpo-adapters"),
                        ({"lora_r": 8, "dpo_lora_r": 4}, "--dpo-lora-r")]:
        with pytest.raises(ValueError, match=match):
            pal.load_run_config(tmp_path, over)
    pal.load_run_config(tmp_path, {"lora_r": 8, "dpo_lora_r": 4, "dpo_adapters": "fresh"})  # fresh: any rank


# ---- the displacement of one DPO schedule --------------------------------------------------------------------------

def displacement(in_f: int, init: str, ratio: float, clip: float, authors_schedule: bool = False, a0=None,
                 out_f: int = 256, steps: int = 153, warmup: int = 100, lr: float = 1e-6, seed: int = 0):
    """||scale B A||_F after Adam runs the presets' DPO schedule (153 steps, 100 warm-up, lr 1e-6) on a toy
    regression of one frozen layer. out_f rows only: under Adam each row of B moves on its own, so the ratio of
    two set-ups does not depend on the number of rows (the bench script runs the full shapes: the same ratios)."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        base.weight.copy_(0.02 * torch.randn(out_f, in_f, generator=g))
    x = torch.randn(16, in_f, generator=g)
    y = x @ (0.02 * torch.randn(out_f, in_f, generator=g)).t()
    if a0 is None:  # this project's layer and optimizer groups, AdamW with weight decay 0 (= Adam)
        layer = modeling.LoRALinear(base, 16, 32, generator=torch.Generator().manual_seed(seed + 1), init=init)
        params, delta = dpo.param_groups(layer, lr, ratio), layer.delta_weight
        opt, a_start = torch.optim.AdamW(params, lr=lr, weight_decay=0.0), layer.lora_A.detach().clone()
    else:  # PEFT's layer and create_loraplus_optimizer, the authors' Adam, from the A given
        from peft.optimizers import create_loraplus_optimizer
        holder = nn.Sequential(base)
        layer = peft.get_peft_model(holder, peft.LoraConfig(r=16, lora_alpha=32, init_lora_weights="gaussian",
                                                            target_modules=["0"]))
        lin = layer.base_model.model[0]
        with torch.no_grad():
            lin.lora_A["default"].weight.copy_(a0)
        opt = create_loraplus_optimizer(model=layer, optimizer_cls=torch.optim.Adam, lr=lr, loraplus_lr_ratio=ratio)
        a_start = a0

        def delta():
            return lin.scaling["default"] * lin.lora_B["default"].weight @ lin.lora_A["default"].weight
    # warm-up: dpo.py's (step + 1) / warmup, or the authors' trainers.py's min(1, (step + 1) / (warmup + 1))
    factor = (lambda s: min(1.0, (s + 1) / (warmup + 1))) if authors_schedule else \
        (lambda s: (s + 1) / warmup if s < warmup else 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    trainable = [p for grp in opt.param_groups for p in grp["params"]]
    for _ in range(steps):
        (layer(x) - y).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return delta().detach().norm().item(), a_start


@pytest.mark.parametrize("shape, in_f", [("GPT-2 c_attn", 768), ("Llama-3.1-8B q", 4096)])
def test_the_authors_lora_moves_W_tens_of_times_further_in_one_dpo_schedule(one_thread, shape, in_f):
    """Issue 21: 48 x (GPT-2 c_attn) and 109 x (Llama q). Derivation (bench/bench_lora_displacement.py's docstring):
    Adam moves B's entries by about lr_B a step whatever the gradient's size, A hardly moves, so ||scale B A|| goes
    with lr_B times the size of A's entries: the ratio is about 16 (LoRA+) x (1/r) / (1/sqrt(3 in)) (Gaussian A
    against Kaiming-uniform A) = sqrt(3 in): 48 and 111. Measured: 46 and 101 (B's steps are not all full steps,
    which costs both set-ups alike but not exactly). The test asks for 75 % to 110 % of the derived ratio."""
    authors, a0 = displacement(in_f, "gaussian", 16.0, 10.0)
    before, _ = displacement(in_f, "kaiming", 1.0, 1.0)
    derived = 16 * math.sqrt(3 * in_f) / 16
    print(f"{shape}: ||dW|| authors' set-up {authors:.3e}, ours before {before:.3e}, ratio {authors / before:.1f} "
          f"(derived {derived:.1f})")
    assert 0.75 * derived <= authors / before <= 1.1 * derived
    # the same run in PEFT with the authors' optimizer and schedule, from the same A: this code's LoRA+ is theirs
    peft_run, _ = displacement(in_f, "gaussian", 16.0, 10.0, authors_schedule=True, a0=a0)
    assert authors == pytest.approx(peft_run, rel=0.02)
