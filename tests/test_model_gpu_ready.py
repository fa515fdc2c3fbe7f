"""model.py ready for the GPU runs (issue 12): the torch floor covers the APIs used; LoRA adapters stay fp32 on a
bf16 base and merge / export round once; repos that ship only pytorch_model.bin load, and never run a pickle;
gated hub repos say how to get in; decoding reads nothing back from the device but its one stop test per step.
"""
import re
import sys
import typing
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import hf_raise_for_status

transformers = pytest.importorskip("transformers")

import model as M  # noqa: E402
from infra import hub  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORE = ["model.py", "dpo.py", "data.py", "nli.py", "pal.py"]
pytestmark = pytest.mark.usefixtures("one_thread")
SEED = 1234


# ---------------------------------------------------------------------------------------------- 1. torch floor

# An API the core files use (a regex over their text) -> the first torch release that has it.
TORCH_APIS = {
    r"enable_gqa\s*=": ("2.5", "F.scaled_dot_product_attention(enable_gqa=...)"),
    r"F\.rms_norm\(": ("2.4", "F.rms_norm"),
    r"torch\.get_autocast_dtype\(": ("2.4", "torch.get_autocast_dtype"),
    r"torch\.is_autocast_enabled\(\s*[^)\s]": ("2.4", "torch.is_autocast_enabled(device_type)"),
    r"torch\.amp\.GradScaler\(": ("2.3", "torch.amp.GradScaler"),
    r"torch\.load\([^)]*mmap\s*=": ("2.1", "torch.load(mmap=...)"),
    r"assign\s*=\s*True": ("2.1", "load_state_dict(assign=True)"),
    r"with torch\.device\(": ("2.0", "torch.device as a context manager"),
    r"weights_only\s*=": ("1.13", "torch.load(weights_only=...)"),
}


def version(s: str) -> tuple[int, ...]:
    return tuple(int(p) for p in s.split("."))


def test_torch_floor_covers_every_api_used():
    reqs = (ROOT / "requirements.txt").read_text()
    floor = re.search(r"^torch\s*>=\s*([\d.]+)", reqs, re.M)
    assert floor, "requirements.txt names no torch>= floor"
    text = "\n".join((ROOT / f).read_text() for f in CORE)
    used = {what: need for pattern, (need, what) in TORCH_APIS.items() if re.search(pattern, text)}
    assert "F.scaled_dot_product_attention(enable_gqa=...)" in used   # the grep finds what we know is there
    too_new = {what: need for what, need in used.items() if version(need) > version(floor[1])}
    assert not too_new, f"requirements.txt says torch>={floor[1]}, but the core files use {too_new}"


# ---------------------------------------------------------------------------------------------- tiny models

LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
             tie_word_embeddings=True)
GPT2 = dict(model_type="gpt2", vocab_size=120, n_positions=64, n_embd=48, n_layer=2, n_head=4)


def tiny(family: str, dtype=torch.float32):
    torch.manual_seed(SEED)
    return M.build_model(M.config_from_hf(LLAMA if family == "llama" else GPT2)).to(dtype).eval()


def ids_for(m, B=2, T=12):
    return torch.randint(0, m.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(SEED + 1))


def with_random_lora(m, std=0.05):
    """r=4, alpha=8 adapters on every target with B ~ N(0, std): scale * B A is about 15 * std times the weights."""
    M.add_lora(m, r=4, alpha=8)
    with torch.no_grad():
        for layer in M.lora_layers(m).values():
            layer.lora_B.normal_(0, std, generator=torch.Generator().manual_seed(SEED + 2))
    return m


# ---------------------------------------------------------------------------------------------- 2. LoRA in fp32

@pytest.mark.parametrize("base_dtype, autocast", [(torch.bfloat16, False), (torch.bfloat16, True),
                                                  (torch.float32, True)], ids=["bf16", "bf16-autocast",
                                                                               "fp32-autocast"])
def test_lora_adapters_stay_fp32_and_keep_tiny_updates(base_dtype, autocast):
    m = with_random_lora(tiny("llama", base_dtype))
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-6, weight_decay=0.0)   # DPO's lr: steps of about 1e-6
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = m(ids_for(m)).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    opt.step()
    moved = torch.cat([(p != before[n])[p.grad != 0] for n, p in trainable.items() if n.endswith("lora_B")])
    assert moved.float().mean() > 0.99, f"only {moved.float().mean():.1%} of B's entries took their 1e-6 step"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_on_bf16_base_is_close_to_fp32(family):
    """The same weights (bf16 values) and adapters, once on a bf16 base and once all in fp32."""
    m16 = with_random_lora(tiny(family, torch.bfloat16))
    m32 = tiny(family, torch.bfloat16).float()
    M.add_lora(m32, r=4, alpha=8)
    M.load_lora_state_dict(m32, M.lora_state_dict(m16))
    ids = ids_for(m16)
    with torch.no_grad():
        got, want = m16(ids), m32(ids)
        with M.lora_disabled(m32):
            base = m32(ids)                                     # the adapters must matter at this scale
    assert got.dtype == torch.bfloat16
    assert (want - base).abs().max() > 0.1
    err = (got.float() - want).abs().max().item()
    assert err < 0.02 * want.abs().max().item(), err   # a few of bf16's relative steps (2^-8 = 0.004)


# ---------------------------------------------------------------------------------------------- 3. merge in fp32

def merged_once(layer: M.LoRALinear) -> torch.Tensor:
    """What merging must give: W + scale * B A summed in fp32, rounded once to W's dtype."""
    w = layer.base.weight
    return (w.float() + layer.scale * (layer.lora_B.float() @ layer.lora_A.float())).to(w.dtype)


def merged_twice(layer: M.LoRALinear) -> torch.Tensor:
    """The old way: the delta rounded to bf16 first, then added in bf16."""
    w = layer.base.weight
    return w + (layer.scale * (layer.lora_B.float() @ layer.lora_A.float())).to(w.dtype)


def plain_copy_with(m, family, weight_of):
    """A LoRA-free bf16 copy of `m`'s base whose wrapped weights are weight_of(layer)."""
    ref = tiny(family, torch.bfloat16)
    with torch.no_grad():
        for name, layer in M.lora_layers(m).items():
            ref.get_submodule(name).weight.copy_(weight_of(layer))
    return ref


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_export_add_in_fp32_and_round_once(tmp_path, family):
    """With a small delta (under a tenth of the weights), rounding twice moves ~7% of the merged weights by one bf16
    step, which changes the logits; rounding once gives, bit for bit, the logits of the weights merged in fp32."""
    m = with_random_lora(tiny(family, torch.bfloat16), std=0.005)
    ids = ids_for(m)
    with torch.no_grad():
        want = plain_copy_with(m, family, merged_once)(ids)
        old = plain_copy_with(m, family, merged_twice)(ids)
    assert (old.float() - want.float()).abs().max() > 0, "this setup cannot tell one rounding from two"

    M.save_model(m, tmp_path)                                   # folds the adapters without merging them
    exported = M.load_model(tmp_path, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), want, rtol=0, atol=0)
        expected = {name: merged_once(layer) for name, layer in M.lora_layers(m).items()}
        M.merge_lora(m)
        for name, layer in M.lora_layers(m).items():
            assert torch.equal(layer.base.weight, expected[name]), name
        torch.testing.assert_close(m(ids), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- 4. pytorch_model.bin

def hf_gpt2_bin(path: Path, fmt: str = "zip", shards: int = 1):
    """A random transformers GPT-2 whose weights are written the way transformers 4.x wrote pytorch_model.bin:
    torch.save of the state dict (the tied lm_head included), with the old causal-mask buffers. transformers 5
    saves safetensors only, so the file is written here. fmt "legacy" is the pre-zip format of torch < 1.6."""
    torch.manual_seed(SEED)
    cfg = transformers.GPT2Config(vocab_size=150, n_positions=128, n_embd=48, n_layer=2, n_head=4,
                                  initializer_range=0.1, bos_token_id=0, eos_token_id=0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    path.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(path / "config.json")
    sd = dict(ref.state_dict())
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    keys = sorted(sd)
    save = {"zip": torch.save, "legacy": lambda obj, f: torch.save(obj, f, _use_new_zipfile_serialization=False)}
    if shards == 1:
        save[fmt](sd, path / "pytorch_model.bin")
        return ref
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        save[fmt](part, path / name)
        weight_map.update({k: name for k in part})
    M.write_json(path / "pytorch_model.bin.index.json", {"metadata": {}, "weight_map": weight_map})
    return ref


@pytest.mark.parametrize("fmt, shards", [("zip", 1), ("legacy", 1), ("zip", 3)], ids=["zip", "legacy", "sharded"])
def test_pytorch_model_bin_loads_and_matches_transformers(tmp_path, fmt, shards):
    ref = hf_gpt2_bin(tmp_path, fmt, shards)
    assert not list(tmp_path.glob("*.safetensors"))
    ours = M.load_model(tmp_path)
    ids = torch.randint(0, 150, (2, 20), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        err = (ours(ids) - ref(ids).logits).abs().max().item()
    assert err < 1e-5, err


class Payload:
    """Unpickling this runs open(path, "w"): a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_crafted_pytorch_model_bin_is_refused_and_not_run(tmp_path):
    hf_gpt2_bin(tmp_path)
    marker = tmp_path / "payload-ran"
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": Payload(marker)}, bin_path)
    with pytest.raises(M.CheckpointError, match=re.escape(f"{bin_path}: refusing to unpickle")):
        M.load_model(tmp_path)
    assert not marker.exists()
    torch.load(bin_path, weights_only=False)   # the payload is real: an unsafe load runs it
    assert marker.exists()


def test_truncated_pytorch_model_bin_is_named(tmp_path):
    hf_gpt2_bin(tmp_path)
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(M.CheckpointError, match=re.escape(f"{f}: corrupt or truncated")):
        M.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------- hub fallback

def fake_hub(monkeypatch, tmp_path, repo_files: dict[str, bytes]):
    """hub.snapshot_download replaced by one that 'downloads' the repo files matching allow_patterns into one
    snapshot directory, as the real one does; returns the list of allow_patterns it was called with."""
    import fnmatch
    snap, calls = tmp_path / "snapshot", []

    def snapshot_download(repo_id, cache_dir, allow_patterns, local_files_only):
        calls.append(list(allow_patterns))
        snap.mkdir(exist_ok=True)
        for name, data in repo_files.items():
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snap / name).write_bytes(data)
        return str(snap)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_hub_fetches_pytorch_model_bin_only_when_there_are_no_safetensors(tmp_path, monkeypatch):
    ref = hf_gpt2_bin(tmp_path / "repo")
    files = {p.name: p.read_bytes() for p in (tmp_path / "repo").iterdir()}
    calls = fake_hub(monkeypatch, tmp_path, files)
    ours = M.load_model("microsoft/tiny-dialogpt")
    assert calls == [hub.HUB_FILES, hub.HUB_BIN_FILES]
    ids = torch.randint(0, 150, (1, 9), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-5

    (tmp_path / "snapshot").rename(tmp_path / "old")          # a repo with both: the bin is never downloaded
    calls = fake_hub(monkeypatch, tmp_path, {**files, "model.safetensors": b"..."})
    path = hub.resolve_model_dir("owner/both")
    assert calls == [hub.HUB_FILES] and not (path / "pytorch_model.bin").exists()


def test_offline_hub_cache_holding_only_pytorch_model_bin(tmp_path, monkeypatch):
    """The real snapshot_download, offline, on a hand-built cache: both calls answer with the one snapshot."""
    ref = hf_gpt2_bin(tmp_path / "repo")
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = tmp_path / "hf_home" / "hub" / "models--microsoft--tiny-dialogpt"
    (cached / "snapshots" / commit).mkdir(parents=True)
    for f in ("config.json", "pytorch_model.bin"):
        (cached / "snapshots" / commit / f).write_bytes((tmp_path / "repo" / f).read_bytes())
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = M.load_model("microsoft/tiny-dialogpt")
    ids = torch.randint(0, 150, (1, 9), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- 5. gated repos

def hub_error(status: int, url: str, error_code: str | None = None) -> HfHubHTTPError:
    """The exception huggingface_hub itself raises for this HTTP answer (its own hf_raise_for_status)."""
    Response = typing.get_type_hints(HfHubHTTPError.__init__)["response"]   # httpx's or its fork's, as installed
    Request = sys.modules[Response.__module__].Request
    headers = {"X-Error-Code": error_code} if error_code else {}
    with pytest.raises(HfHubHTTPError) as e:
        hf_raise_for_status(Response(status, headers=headers, request=Request("GET", url)))
    return e.value


def raising(err):
    def snapshot_download(*args, **kwargs):
        raise err
    return snapshot_download


def test_gated_repo_says_accept_the_licence_and_log_in(monkeypatch):
    name = "meta-llama/Llama-3.1-8B"
    err = hub_error(403, f"https://huggingface.co/{name}/resolve/main/config.json", "GatedRepo")
    assert type(err).__name__ == "GatedRepoError"
    monkeypatch.setattr(hub, "snapshot_download", raising(err))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(PermissionError) as e:
        hub.resolve_model_dir(name)
    msg = str(e.value)
    assert "is gated" in msg and f"https://huggingface.co/{name}" in msg
    assert "hf auth login" in msg and "HF_TOKEN" in msg


def test_401_without_a_token_suggests_logging_in(monkeypatch):
    name = "meta-llama/Llama-3.1-8B"
    err = hub_error(401, f"https://huggingface.co/api/models/{name}/revision/main")
    assert type(err).__name__ == "RepositoryNotFoundError"
    monkeypatch.setattr(hub, "snapshot_download", raising(err))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="gated or private, or does not exist.*hf auth login"):
        hub.resolve_model_dir(name)
    monkeypatch.setattr(hub, "get_token", lambda: "hf_xxx")   # a token the hub refused: plainly not found
    with pytest.raises(FileNotFoundError, match="unknown model"):
        hub.resolve_model_dir(name)


# ---------------------------------------------------------------------------------------------- 6. no host syncs

READS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy")


@pytest.fixture
def count_reads(monkeypatch):
    """Count every read of a tensor's value back into Python (on a GPU, each one waits for the device)."""
    counter = {"n": 0}
    for attr in READS:
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _original=original, **k):
            counter["n"] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, attr, counted)
    return counter


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_and_decode_steps_read_nothing_back(family, count_reads):
    m = tiny(family)
    ids = ids_for(m)
    with torch.no_grad():
        m(ids)                                                    # a training-shaped forward: no mask, no cache
        cache = m.new_cache(2, 16)
        m(ids[:, :8], cache=cache)                                # prefill
        for t in range(8, 12):                                    # decode steps at explicit positions
            m(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), cache=cache)
    assert count_reads["n"] == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_reads_one_value_per_step(family, count_reads):
    """The stop test reads one value per step; the prefill's padding test and the copy of the output are per call."""
    m, prompts, reads = tiny(family), [[5, 6, 7, 8, 9], [3, 4]], []
    for n in (10, 20):
        count_reads["n"] = 0
        M.generate(m, prompts, n, stop_ids=[])
        reads.append(count_reads["n"])
    assert reads[1] - reads[0] == 10, reads


def test_gpt2_still_refuses_positions_beyond_its_table():
    m = tiny("gpt2")                                              # n_positions = 64
    with torch.no_grad():
        m(torch.zeros(1, 64, dtype=torch.long))
        with pytest.raises(ValueError, match=r"positions 0\.\.63 only, got a sequence of 65 tokens"):
            m(torch.zeros(1, 65, dtype=torch.long))
        cache = m.new_cache(1, 80)
        m(torch.zeros(1, 64, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="sequence of 65 tokens"):
            m(torch.zeros(1, 1, dtype=torch.long), cache=cache)
