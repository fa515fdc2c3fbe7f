"""GPT-2 and Llama written by hand, loaded from Hugging Face checkpoints, decoded greedily with a KV cache.

Read top to bottom:
  1. configs     GPT2Config, LlamaConfig: filled from a checkpoint's config.json, written back by .to_hf()
  2. pieces      attention mask, attention (GQA), the preallocated KV cache, fp32 norms, init
  3. GPT-2       learned positions, pre-LayerNorm blocks, tanh-GELU MLP, tied head: model(ids[B,T]) -> logits[B,T,V]
  4. Llama       RMSNorm, RoPE (with Llama 3.1 frequency scaling), grouped-query attention, SwiGLU MLP
  5. LoRA        LoRALinear (adapters in fp32 on any base) and the helpers that add / merge / disable / save them;
                 prompt tuning: SoftPrompt, trainable vectors read through virtual token ids past the vocabulary
  6. generate    batched greedy decoding: left padding, one prefill, then one-token steps on the cache
  7. load/save   the rename table to Hugging Face's names, read_checkpoint (every key and shape checked), load_model,
                 save_model. Where the files come from and how they are read (a local directory or a hub id;
                 safetensors, or pytorch_model.bin with weights_only) is infra/hub.py; atomic writes infra/files.py

Shape names: B batch, T new tokens in this call, S keys attended (cache length), C model width,
H query heads, Hkv key/value heads (GQA: Hkv divides H), D head dim, V vocabulary.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import save_file

from infra.exports import read_prompt_adapter, write_lora, write_prompt_adapter  # machinery: a reader steps over it
from infra.files import CheckpointError, atomic_path, read_json, write_json
from infra.hub import checkpoint_files, checkpoint_reader, read_safetensors, resolve_model_dir


# ----------------------------------------------------------------------------------------------------------------------
# 1. Configs. Defaults are Hugging Face's defaults, because save_pretrained may leave out keys equal to them.

GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}


@dataclass
class GPT2Config:
    """GPT-2 family: gpt2 (small..xl), microsoft/DialoGPT-*, uer/gpt2-chinese-cluecorpussmall."""
    SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")  # config.json must give these
    vocab_size: int = 50257
    n_positions: int = 1024          # learned position table size: the longest sequence the model can see
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None       # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"  # a key of GELU_APPROXIMATION
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    add_cross_attention: bool = False

    @classmethod
    def from_hf(cls, hf: dict) -> "GPT2Config":
        cfg = cls(**{k: v for k, v in hf.items() if k in cls.__dataclass_fields__})   # config.json has many more keys
        if (cfg.scale_attn_by_inverse_layer_idx or cfg.add_cross_attention or not cfg.scale_attn_weights
                or not cfg.tie_word_embeddings):   # no GPT-2 checkpoint we know of has any of these
            raise NotImplementedError("GPT-2 variants with scale_attn_by_inverse_layer_idx, add_cross_attention, "
                                      "unscaled attention or an untied lm_head are not supported")
        if cfg.activation_function not in GELU_APPROXIMATION:
            raise NotImplementedError(f"GPT-2 activation_function {cfg.activation_function!r} is not supported "
                                      f"(known: {sorted(GELU_APPROXIMATION)})")
        return cfg

    def to_hf(self) -> dict:
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **asdict(self)}


@dataclass
class LlamaConfig:
    """Llama family: Llama 2, Llama 3 / 3.1 / 3.2 (llama3 RoPE scaling, GQA, tied or untied head), SmolLM2."""
    SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None   # GQA: fewer K/V heads than query heads; None means = num_attention_heads
    head_dim: int | None = None              # None means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # None, or {"rope_type": "llama3" | "linear", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise NotImplementedError(f"Llama hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.rope_scaling is not None:
            s = {k: v for k, v in self.rope_scaling.items() if k != "rope_theta"}
            s.setdefault("rope_type", s.pop("type", None) or "default")  # transformers 4.x wrote "type"
            if s["rope_type"] not in ("default", "linear", "llama3"):
                raise NotImplementedError(f"rope_scaling type {s['rope_type']!r} is not supported "
                                          "(known: default, linear, llama3)")
            self.rope_scaling = None if s["rope_type"] == "default" else s

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        kw = {k: v for k, v in hf.items() if k in cls.__dataclass_fields__}
        if rope := hf.get("rope_parameters"):   # transformers >= 5 keeps rope_theta and the scaling together here
            kw["rope_theta"] = rope.get("rope_theta", kw.get("rope_theta", 10000.0))
            kw["rope_scaling"] = dict(rope)
        return cls(**kw)

    def to_hf(self) -> dict:
        hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(self)}
        # Both spellings of the RoPE settings, so that transformers 4.x and 5.x read the same thing.
        hf["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        return hf


def config_from_hf(hf: dict, where: str = "config.json"):
    """GPT2Config or LlamaConfig, chosen by config.json's model_type. The family's SHAPE_KEYS must be there as
    positive integers: they fix the weights' shapes, and a default in their place would build a model of another
    size, whose mismatch would then be blamed on model.safetensors."""
    configs, model_type = {"gpt2": GPT2Config, "llama": LlamaConfig}, hf.get("model_type")
    if model_type not in configs:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (known: {sorted(configs)})")
    cls = configs[model_type]
    if missing := [k for k in cls.SHAPE_KEYS if k not in hf]:
        raise CheckpointError(f"{where}: lacks {', '.join(map(repr, missing))}, needed to build a {model_type} model")
    if bad := [k for k in cls.SHAPE_KEYS if type(hf[k]) is not int or hf[k] <= 0]:   # (a bool is no int here)
        raise CheckpointError(f"{where}: {bad[0]!r} must be a positive integer, got {hf[bad[0]]!r}")
    return cls.from_hf(hf)


def max_positions(cfg) -> int:
    """The longest sequence the model may see: GPT-2's position table has n_positions rows (nothing beyond it),
    Llama's RoPE was trained up to max_position_embeddings."""
    return cfg.n_positions if isinstance(cfg, GPT2Config) else cfg.max_position_embeddings


# ----------------------------------------------------------------------------------------------------------------------
# 2. Pieces shared by both families.


def attend(q, k, v, mask, is_causal: bool, dropout_p: float = 0.0):
    """softmax(q k^T / sqrt(D) + mask) v, the softmax in fp32 inside the kernel even for bf16 inputs.
    q (B, H, T, D); k, v (B, Hkv, S, D) -> (B, H, T, D). GQA: query head h uses K/V head h // (H // Hkv)."""
    (B, H, T, D), Hkv = q.shape, k.shape[1]
    if T == 1 and Hkv != H:
        # One query per row (a decode step): put the H // Hkv queries that share a K/V head side by side as
        # rows of one attention problem, so the cached K/V are read once and never repeated in memory.
        qg = q.view(B, Hkv, H // Hkv, D)                                        # (B, Hkv, H/Hkv, D)
        y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=dropout_p)
        return y.view(B, H, 1, D)
    if mask is not None and Hkv != H:
        # A mask with GQA (a left-padded prefill): CUDA's flash kernel takes no mask and its memory-efficient one no
        # enable_gqa, so SDPA would fall back to the math kernel and hold the (B, H, T, S) scores in fp32. K/V
        # repeated to H heads (B, H, S, D) let the memory-efficient kernel run; the result is the same.
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=Hkv != H)


class KVCache:
    """Preallocated keys and values of every layer, written in place at explicit slots (no torch.cat per step).
    Slots [0, length) are filled; left padding keeps the rows aligned, so one `length` serves the whole batch, and
    `key_valid` (B, S_max) marks the slots that hold real tokens."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device).unbind(0)   # L views (B, Hkv, S_max, D), made once
        self.v = torch.zeros(shape, dtype=dtype, device=device).unbind(0)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.padded = False   # True once some slot is padding; otherwise masks can be skipped
        self.length, self.max_len = 0, max_len

    def append_mask(self, attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """Record the validity of T new slots; return key validity (B, length + T) or None when nothing is padding."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {T} tokens > max_len {self.max_len}")
        if attention_mask is not None and not bool(attention_mask.all()):
            self.key_valid[:, self.length:self.length + T] = attention_mask.bool()
            self.padded = True
        return self.key_valid[:, :self.length + T] if self.padded else None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at slots [length, length + T) of `layer`; return all keys/values so far."""
        T, kc, vc = k.shape[2], self.k[layer], self.v[layer]
        kc.narrow(2, self.length, T).copy_(k)
        vc.narrow(2, self.length, T).copy_(v)
        return kc.narrow(2, 0, self.length + T), vc.narrow(2, 0, self.length + T)


def positions_and_mask(input_ids, attention_mask, position_ids, cache: KVCache | None, dtype):
    """Positions (B, T) and the attention mask of T new tokens over S = past + T keys: (pos, mask, is_causal).

    Positions default to past..past+T-1, like transformers; the cache remembers which of its slots are padding, so
    decode steps need no attention_mask. mask is None when attention is plainly causal (is_causal) or a lone query
    sees every key; else it is additive (B or 1, 1, T, S), masked entries holding the dtype's minimum, not -inf, so
    a query that sees no valid key (a left-padding position) gets a uniform softmax, not 0/0 = NaN."""
    B, T = input_ids.shape
    past = cache.length if cache is not None else 0
    pos = position_ids if position_ids is not None else torch.arange(past, past + T, device=input_ids.device
                                                                     ).expand(B, T)
    if cache is not None:
        key_valid = cache.append_mask(attention_mask, T)                              # (B, S) or None
    elif attention_mask is not None and not bool(attention_mask.all()):
        key_valid = attention_mask.bool()                                             # (B, S)
    else:
        key_valid = None                                                              # no padding
    if key_valid is None and (T == 1 or past == 0):
        return pos, None, T > 1
    allowed = torch.ones(T, past + T, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)[None, None]
    if key_valid is not None:                                                         # (1, 1, T, S) ->
        allowed = allowed & key_valid[:, None, None, :]                               # (B, 1, T, S)
    zero = torch.zeros((), dtype=dtype, device=input_ids.device)
    return pos, torch.where(allowed, zero, torch.finfo(dtype).min), False


def run_block(model: nn.Module, block: nn.Module, x: torch.Tensor, *args, cache=None, layer: int = 0):
    """block(x, *args, cache, layer). With model.recompute set, while gradients are on and no KV cache is used
    (training), the block's activations are not kept for the backward pass but recomputed there from its input
    (activation checkpointing): memory of one block instead of every block's, for about a third more compute.
    The recomputation replays the same random state, so dropout masks and results are unchanged."""
    if model.recompute and cache is None and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, x, *args, cache=None, layer=layer, use_reentrant=False)
    return block(x, *args, cache=cache, layer=layer)


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weights' dtype (bf16 statistics are too coarse)."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
                            ).to(x.dtype)


def _init_weights(model: nn.Module, std: float = 0.02):
    """GPT-2 style init for models built from scratch (tests, training from zero); loading overwrites all of it."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------------
# 3. GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, lm_head tied to the token embedding.


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)   # q, k, v in one matrix
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, mask, is_causal, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)   # 3 x (B, H, T, D)
                   for t in self.c_attn(x).split(C, dim=2))                       # from 3 x (B, T, C)
        if cache is not None:
            k, v = cache.update(layer, k, v)                           # (B, H, S, D)
        y = attend(q, k, v, mask, is_causal, self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)                          # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        width = cfg.n_inner or 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, width)
        self.c_proj = nn.Linear(width, cfg.n_embd)
        self.approximate = GELU_APPROXIMATION[cfg.activation_function]
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = LayerNormFP32(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = LayerNormFP32(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, mask, is_causal, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    family = "gpt2"

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNormFP32(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.soft_prompt: SoftPrompt | None = None   # prompt tuning (add_soft_prompt); None: plain embeddings
        self.recompute = False  # activation checkpointing while training (run_block; TrainConfig.recompute)
        # No lm_head module: the output projection *is* wte.weight (tied), so there is nothing to keep in sync.
        _init_weights(self)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                last_only: bool = False, hidden_only: bool = False):
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only (prefill needs only the last one).
        hidden_only: the final normed hidden states (B, T or 1, C) instead, for a caller that projects only some
        tokens itself with `output_weight`. attention_mask (B, T): 1 = token, 0 = padding; right-padded training
        batches need none (a real token never sees the padding after it); left-padded ones pass position_ids
        counted from each row's first real token. Llama.forward takes and returns the same."""
        # A learned table has nothing beyond its last row. Positions never exceed their slot in the sequence (the
        # default ones equal it; left-padded rows count from their first real token), so the number of slots bounds
        # them, on Python ints: reading pos.max() back from the GPU would stall it at every decode step.
        if (n_slots := (cache.length if cache is not None else 0) + input_ids.shape[1]) > self.config.n_positions:
            raise ValueError(f"GPT-2 has positions 0..{self.config.n_positions - 1} only, got a sequence of "
                             f"{n_slots} tokens")
        pos, mask, is_causal = positions_and_mask(input_ids, attention_mask, position_ids, cache,
                                                  self.wte.weight.dtype)          # pos (B, T)
        tok = self.wte(input_ids) if self.soft_prompt is None else self.soft_prompt(input_ids, self.wte)
        x = self.drop(tok + self.wpe(pos))                                # (B, T, C)
        for i, block in enumerate(self.h):
            x = run_block(self, block, x, mask, is_causal, cache=cache, layer=i)
        if cache is not None:
            cache.length += input_ids.shape[1]
        x = self.ln_f(x[:, -1:] if last_only else x)                      # (B, T, C)
        return x if hidden_only else F.linear(x, self.output_weight)      # (B, T, V)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.wte.weight                                            # (V, C): tied to the embedding

    def new_cache(self, batch, max_len) -> KVCache:
        c, w = self.config, self.wte.weight
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head, w.dtype, w.device)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Llama: RMSNorm, rotary positions (rotate-half layout), grouped-query attention, SwiGLU MLP.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) in fp32; back to the model dtype *before* the weight, as Llama's reference does.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Rotation frequency of each of the D/2 channel pairs, fp32 (D/2,), with the configured long-context scaling.
    Llama 3.1 ("llama3") scaling: wavelengths shorter than original_len / high_freq_factor keep their frequency,
    those longer than original_len / low_freq_factor are slowed by `factor`, and the band between blends the two."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    if (s := cfg.rope_scaling) is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)        # 0 at the long-wavelength edge, 1 at the short one
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, blended)
    return torch.where(wavelen < old_len / high, inv_freq, out)


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos, sin tables for positions (B, T) -> two (B, 1, T, D), sin with the sign of rotate-half folded in."""
    angles = position_ids[:, None, :, None].float() * inv_freq        # (B, 1, T, D/2), fp32
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each channel pair (i, i + D/2) of x (B, h, T, D) by its angle: the rotate-half layout of HF Llama.
    rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * (-1 | +1); the signs already sit in `sin`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)   # x*cos + roll(x)*sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, bias = cfg.hidden_size, cfg.attention_bias
        self.q = nn.Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)   # GQA: only Hkv heads of K and V
        self.v = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.o = nn.Linear(self.n_head * self.head_dim, C, bias=bias)
        self.dropout = cfg.attention_dropout

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)                                     # (B, Hkv, S, D)
        y = attend(q, k, v, mask, is_causal, self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        C, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate = nn.Linear(C, I, bias=bias)
        self.up = nn.Linear(C, I, bias=bias)
        self.down = nn.Linear(I, C, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))   # SwiGLU


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    family = "llama"

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied models (Llama 3.2 1B/3B, SmolLM2) have no lm_head: the output projection is embed.weight.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.soft_prompt: SoftPrompt | None = None   # prompt tuning (add_soft_prompt); None: plain embeddings
        self.recompute = False  # activation checkpointing while training (run_block; TrainConfig.recompute)
        # A plain fp32 attribute, not a buffer: model.to(bfloat16) must not round the frequencies, and a model
        # built on the meta device still gets real values (computed on the CPU, moved on first use).
        self.inv_freq = rope_inv_freq(cfg)
        _init_weights(self)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                last_only: bool = False, hidden_only: bool = False):
        """Same inputs and outputs as GPT2.forward: logits (B, T or 1, V), or normed hidden states with hidden_only."""
        x = self.embed(input_ids) if self.soft_prompt is None else self.soft_prompt(input_ids, self.embed)  # (B,T,C)
        pos, mask, is_causal = positions_and_mask(input_ids, attention_mask, position_ids, cache, x.dtype)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)             # (B, 1, T, D) each
        for i, block in enumerate(self.layers):
            x = run_block(self, block, x, cos, sin, mask, is_causal, cache=cache, layer=i)
        if cache is not None:
            cache.length += input_ids.shape[1]
        x = self.norm(x[:, -1:] if last_only else x)                     # (B, T, C)
        return x if hidden_only else F.linear(x, self.output_weight)     # (B, T, V)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight  # (V, C)

    def new_cache(self, batch, max_len) -> KVCache:
        c, w = self.config, self.embed.weight
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim, w.dtype, w.device)


def build_model(cfg) -> nn.Module:
    """A randomly initialised model for a config object."""
    return GPT2(cfg) if isinstance(cfg, GPT2Config) else Llama(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# 5. LoRA: W x + (alpha / r) * B A x, with A (r, in) random and B (out, r) zero, so training starts from the base model;
#    A and B in fp32. A is drawn as nn.Linear's weights ("kaiming", PEFT's default) or from N(0, 1/r^2) ("gaussian",
#    PEFT's init_lora_weights="gaussian", which the authors' train_lora.py uses).


LORA_INITS = ("kaiming", "gaussian")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Merging (W += scale * B A) is explicit: merge() /
    unmerge(); nothing merges behind your back on .eval().

    A and B are fp32 whatever the base's dtype (as PEFT keeps them): in bf16, B would lose the small steps of
    fine-tuning (AdamW at lr 1e-6 moves an entry of 0.05 by about 1e-6; bf16's spacing there is 2.4e-4)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 generator: torch.Generator | None = None, init: str = "kaiming"):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        if init not in LORA_INITS:
            raise ValueError(f"LoRA init must be one of {LORA_INITS}, got {init!r}")
        self.base = base
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device, dtype=torch.float32))
        if init == "gaussian":  # N(0, 1/r^2) whatever the width (PEFT's "gaussian")
            nn.init.normal_(self.lora_A, std=1 / r, generator=generator)
        else:  # nn.Linear's weight init: uniform, bound 1/sqrt(in)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged, self.disabled = False, False   # disabled (set by lora_disabled): act as the base alone
        base.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, (out, in), in fp32 (even inside a caller's autocast)."""
        with torch.autocast(self.lora_A.device.type, enabled=False):
            return self.scale * (self.lora_B @ self.lora_A)

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A in W's dtype: summed in fp32 and rounded once. (Adding the delta already rounded to bf16
        would round twice, and move some weights by one bf16 step more than the adapters say.)"""
        w = self.base.weight
        return (w.float() + self.delta_weight()).to(w.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_(w.float() - self.delta_weight())   # fp32 too; in bf16, W is back only to within its rounding
            self.merged = False

    def forward(self, x):
        if self.disabled and self.merged:
            raise RuntimeError("lora_disabled() on a merged LoRA layer: unmerge_lora(model) first")
        y = self.base(x)                                               # (..., out), in the base's dtype
        if self.disabled or self.merged:
            return y
        # The adapter in fp32, added in the base's dtype. Under autocast its matmuls run in the autocast dtype like
        # every other; the gradients still land on the fp32 A and B, which are what the optimizer updates.
        # Under autocast x stays in its dtype (F.linear casts it to the autocast dtype anyway: an fp32 copy of x
        # would only cost memory and time); outside it, x meets the fp32 A in fp32.
        xa = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
        low = F.linear(self.dropout(xa), self.lora_A)                       # (..., in) -> (..., r)
        return y + (self.scale * F.linear(low, self.lora_B)).to(y.dtype)    # (..., r) -> (..., out)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


# What each LoRA target names in each family. GPT-2 computes q, k, v with one fused matrix (c_attn): asking for
# any of them wraps that matrix.
LORA_TARGETS = {
    "gpt2": {"q": ["attn.c_attn"], "k": ["attn.c_attn"], "v": ["attn.c_attn"], "o": ["attn.c_proj"],
             "mlp": ["mlp.c_fc", "mlp.c_proj"]},
    "llama": {"q": ["attn.q"], "k": ["attn.k"], "v": ["attn.v"], "o": ["attn.o"],
              "mlp": ["mlp.gate", "mlp.up", "mlp.down"]},
}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             targets=("q", "k", "v", "o", "mlp"), seed: int | None = None, init: str = "kaiming") -> list[str]:
    """Wrap the targeted nn.Linear layers of every block in LoRALinear and freeze everything else (only lora_A /
    lora_B require grad afterwards). seed: the A matrices are drawn from their own generator, so that the same seed
    gives the same adapters whatever ran before (None: the global random stream). init: how A is drawn,
    "kaiming" or "gaussian" (LORA_INITS). Returns the wrapped names."""
    table = LORA_TARGETS[model.family]
    if unknown := set(targets) - set(table):
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; known: {sorted(table)}")
    if lora_layers(model):
        raise RuntimeError("the model already has LoRA layers")
    suffixes = sorted({s for t in targets for s in table[t]})
    model.requires_grad_(False)
    prefix = "h" if model.family == "gpt2" else "layers"
    gen = None if seed is None else torch.Generator(next(model.parameters()).device).manual_seed(seed)
    wrapped = []
    for i, block in enumerate(getattr(model, prefix)):
        for suffix in suffixes:
            parent_name, _, leaf = suffix.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout, gen, init))
            wrapped.append(f"{prefix}.{i}.{suffix}")
    return wrapped


def merge_lora(model: nn.Module):
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_layers(model).values():
        m.unmerge()


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Inside this block the model is its base (e.g. the DPO reference), without a second copy of the weights."""
    layers = list(lora_layers(model).values())
    if any(m.merged for m in layers):
        raise RuntimeError("lora_disabled() on a merged model: unmerge_lora(model) first")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)}."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]):
    """Copy adapters into a model that already has the same LoRA layers; every key and shape must match."""
    own = lora_state_dict(model)
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or extra:
        raise CheckpointError(f"LoRA state dict does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    if any(m.merged for m in lora_layers(model).values()):
        raise RuntimeError("load LoRA weights into an unmerged model (unmerge_lora first)")
    with torch.no_grad():
        for k, t in own.items():
            if tuple(sd[k].shape) != tuple(t.shape):
                raise CheckpointError(f"LoRA key {k!r} has shape {tuple(sd[k].shape)}, "
                                      f"the model needs {tuple(t.shape)}")
            t.copy_(sd[k])


def save_lora(model: nn.Module, path):
    """Adapters only, as safetensors, with r / alpha in the metadata (atomic write)."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise RuntimeError("the model has no LoRA layers")
    write_lora(path, lora_state_dict(model), layers[0].r, layers[0].alpha)


def load_lora(model: nn.Module, path):
    load_lora_state_dict(model, read_safetensors(path))


# Prompt tuning (Lester et al. 2021): n trainable vectors placed before every input, every model weight frozen.
# The vectors answer to n *virtual* token ids V .. V+n-1, just past the vocabulary, so a soft-prompted input is an
# ordinary id sequence [V, ..., V+n-1, prompt ids...]: batching, padding, positions, the KV cache and the loss work
# unchanged, and generating from such ids is exactly a forward pass with the vectors prepended to the embeddings.


class SoftPrompt(nn.Module):
    """The prompt vectors (n, C), fp32 like LoRA's adapters, initialised from the embeddings of `init_ids`
    (token ids, repeated or cut to n: Lester et al. found vocabulary-based starts train better than random ones)."""

    def __init__(self, embedding: nn.Embedding, n_tokens: int, init_ids: list[int]):
        super().__init__()
        if n_tokens <= 0 or not init_ids:
            raise ValueError(f"a soft prompt needs n_tokens > 0 and init ids, got {n_tokens} and {len(init_ids)}")
        self.vocab_size = embedding.num_embeddings
        rows = torch.tensor([init_ids[k % len(init_ids)] for k in range(n_tokens)], device=embedding.weight.device)
        self.vectors = nn.Parameter(embedding.weight.detach()[rows].float().clone())   # (n, C)

    @property
    def ids(self) -> list[int]:
        """The virtual ids a caller puts before each prompt."""
        return list(range(self.vocab_size, self.vocab_size + self.vectors.shape[0]))

    def forward(self, input_ids: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        """(B, T) ids -> (B, T, C): the embedding's rows, and prompt vectors where an id is virtual."""
        virtual = input_ids >= self.vocab_size                                        # (B, T)
        x = embedding(input_ids.masked_fill(virtual, 0))                              # (B, T, C)
        k = (input_ids - self.vocab_size).clamp(0, self.vectors.shape[0] - 1)         # (B, T) row of each id
        return torch.where(virtual[..., None], self.vectors[k].to(x.dtype), x)


# A trained soft prompt is saved as a PEFT prompt-tuning adapter in a directory of its own, beside the frozen weights.
SOFT_PROMPT_DIR = "soft_prompt"


def add_soft_prompt(model: nn.Module, n_tokens: int, init_ids: list[int]) -> list[int]:
    """Freeze every weight of `model` and give it n trainable prompt vectors; returns their virtual ids."""
    if model.soft_prompt is not None:
        raise RuntimeError("the model already has a soft prompt")
    model.requires_grad_(False)
    embedding = model.wte if model.family == "gpt2" else model.embed
    model.soft_prompt = SoftPrompt(embedding, n_tokens, init_ids)
    return model.soft_prompt.ids


def soft_prompt_ids(model: nn.Module) -> list[int]:
    """The virtual ids to put before each prompt: none for a model without a soft prompt."""
    return [] if model.soft_prompt is None else model.soft_prompt.ids


def save_soft_prompt(model: nn.Module, out_dir):
    """The prompt vectors as a PEFT prompt-tuning adapter directory (infra/adapters.py)."""
    cfg = model.config
    layers, heads = (cfg.n_layer, cfg.n_head) if model.family == "gpt2" else (cfg.num_hidden_layers,
                                                                              cfg.num_attention_heads)
    write_prompt_adapter(out_dir, model.soft_prompt.vectors, layers, heads, getattr(model, "name_or_path", None))


def load_soft_prompt(model: nn.Module, adapter_dir) -> list[int]:
    """Give `model` the prompt vectors of a saved adapter directory (their width must be the model's); returns their
    virtual ids."""
    width = model.config.n_embd if model.family == "gpt2" else model.config.hidden_size
    vectors = read_prompt_adapter(adapter_dir, width)
    ids = add_soft_prompt(model, vectors.shape[0], [0])
    with torch.no_grad():
        model.soft_prompt.vectors.copy_(vectors)
    return ids


# ----------------------------------------------------------------------------------------------------------------------
# 6. Greedy generation with a KV cache.


@torch.inference_mode()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids=None) -> list[list[int]]:
    """Greedy continuation of each prompt; returns each row's new tokens, up to and excluding its first stop id.

    Prompts are left-padded into one batch (B, T), so every row's last prompt token sits in the same column, with
    positions counted from each row's first real token. One prefill fills the cache, then each step feeds one
    token per row. Stopped rows keep being computed (cheaper than reshaping the batch) until every row has stopped.
    """
    stop_ids = [] if stop_ids is None else [stop_ids] if isinstance(stop_ids, int) else [int(s) for s in stop_ids]
    B = len(prompts)
    if B == 0 or max_new_tokens <= 0:
        return [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    device, T = next(model.parameters()).device, max(lengths)
    if model.family == "gpt2" and T + max_new_tokens - 1 > model.config.n_positions:
        raise ValueError(f"GPT-2 sees at most n_positions={model.config.n_positions} tokens: a {T}-token prompt "
                         f"leaves room for {model.config.n_positions - T + 1} new tokens, not {max_new_tokens}")

    ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)  # (B, T)
    mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)     # (B, T)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)          # (B, T): 0 at each row's first real token
    next_pos = torch.tensor(lengths, device=device)[:, None]  # (B, 1): position of the first new token

    was_training = model.training
    model.eval()
    cache = model.new_cache(B, T + max_new_tokens)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    n_new = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)  # tokens kept per row
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    try:
        logits = model(ids, attention_mask=mask, position_ids=pos, cache=cache, last_only=True)  # (B, 1, V)
        for step in range(max_new_tokens):
            tok = logits[:, -1].argmax(dim=-1)                    # (B,)
            out[:, step] = tok
            hit = torch.isin(tok, stops) & ~done                  # rows whose first stop is this token
            n_new.masked_fill_(hit, step)
            done |= hit
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = model(tok[:, None], position_ids=next_pos, cache=cache)  # (B, 1, V): one-token step
            next_pos += 1
    finally:
        model.train(was_training)
    out, n_new = out.cpu(), n_new.tolist()
    return [out[b, :n_new[b]].tolist() for b in range(B)]


# ----------------------------------------------------------------------------------------------------------------------
# 7. Loading and saving Hugging Face checkpoints.
#
# Our parameter names -> the checkpoint's. One row per kind of key; (\d+) is the layer index.
# GPT-2 keeps Hugging Face's names (like nanoGPT) under "transformer."; its four Conv1D weights are stored
# (in, out), the transpose of nn.Linear's (out, in).

GPT2_TO_HF = [(r"(.+)", "transformer.{}")]
GPT2_TRANSPOSED = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
GPT2_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")   # causal-mask buffers, not parameters

LLAMA_TO_HF = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", "model.layers.{}.input_layernorm.weight"),
    (r"layers\.(\d+)\.attn\.([qkvo])\.(weight|bias)", "model.layers.{}.self_attn.{}_proj.{}"),
    (r"layers\.(\d+)\.mlp_norm\.weight", "model.layers.{}.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)\.(weight|bias)", "model.layers.{}.mlp.{}_proj.{}"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
LLAMA_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old checkpoints kept this buffer


def hf_name(model: nn.Module, ours: str) -> str:
    """The checkpoint key holding our parameter `ours`."""
    for pattern, template in (GPT2_TO_HF if model.family == "gpt2" else LLAMA_TO_HF):
        if m := re.fullmatch(pattern, ours):
            return template.format(*m.groups())
    raise KeyError(f"no Hugging Face name for parameter {ours!r} of {type(model).__name__}")


def is_transposed(model: nn.Module, ours: str) -> bool:
    return model.family == "gpt2" and GPT2_TRANSPOSED.fullmatch(ours) is not None


def _canonical_key(model: nn.Module, key: str) -> str | None:
    """Checkpoint key as our table writes it, or None for keys that hold no parameter (ignored buffers)."""
    if model.family == "gpt2":
        bare = key.removeprefix("transformer.")
        if GPT2_IGNORED.fullmatch(bare):
            return None
        return key if bare == "lm_head.weight" else "transformer." + bare   # with or without the prefix
    return None if LLAMA_IGNORED.fullmatch(key) else key


def read_checkpoint(model: nn.Module, model_dir: Path, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Our state dict from the checkpoint in `model_dir`, renamed and transformed. Every key and shape is checked
    before its tensor is read (from the header, or the mapped pytorch_model.bin); tensors are converted one at a
    time, so the weights are never held twice.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # model may live on `meta`
    ours_of = {hf_name(model, name): name for name in expected}                  # checkpoint key -> our name
    tied = model.family == "gpt2" or model.config.tie_word_embeddings
    embed_shape = expected["wte.weight" if model.family == "gpt2" else "embed.weight"]
    sd: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        shapes, read = checkpoint_reader(path)
        for key, shape in shapes.items():
            canon = _canonical_key(model, key)
            if canon is None:
                continue
            if canon == "lm_head.weight" and tied:   # some tied checkpoints also store the head: skip it, if it
                if shape != embed_shape:             # at least has the shape of the embedding it is tied to
                    raise CheckpointError(f"{path}: key 'lm_head.weight' has shape {shape}, but the head is tied "
                                          f"to the token embedding of shape {embed_shape}")
                continue
            if (ours := ours_of.get(canon)) is None:
                raise CheckpointError(f"{path}: unexpected key {key!r} with shape {shape}: no parameter of "
                                      f"{type(model).__name__} maps to it (is config.json the right one?)")
            if ours in sd:
                raise CheckpointError(f"{path}: key {key!r} appears twice in the checkpoint")
            transposed = is_transposed(model, ours)
            want = expected[ours][::-1] if transposed else expected[ours]   # in the checkpoint's layout
            if shape != want:
                raise CheckpointError(f"{path}: key {key!r} has shape {shape} but parameter {ours!r} needs "
                                      f"{want} (checkpoint layout)")
            t = read(key)
            sd[ours] = (t.t() if transposed else t).to(device=device, dtype=dtype).contiguous()
    if missing := [n for n in expected if n not in sd]:
        lines = [f"  {hf_name(model, n)!r} (parameter {n!r}, shape {expected[n]})" for n in missing[:10]]
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} key(s):\n" + "\n".join(lines) + more)
    return sd


def read_config(name_or_path):
    """GPT2Config or LlamaConfig from the config.json of a model directory or hub id, no weights read: what a
    pipeline checks (positions, vocabulary) before it trains or saves anything."""
    path = resolve_model_dir(name_or_path) / "config.json"
    return config_from_hf(read_json(path), str(path))


def load_model(name_or_path, dtype=torch.float32, device="cpu") -> nn.Module:
    """Build the model that `name_or_path`'s config.json describes and load its weights (eval mode)."""
    model_dir = resolve_model_dir(name_or_path)
    cfg = read_config(model_dir)
    with torch.device("meta"):          # parameters without storage: the checkpoint's tensors become them
        model = build_model(cfg)
    model.load_state_dict(read_checkpoint(model, model_dir, dtype, device), strict=True, assign=True)
    model.name_or_path = str(name_or_path)
    return model.eval()


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the checkpoint's names and layout; LoRA layers contribute their merged_weight() (summed in
    fp32, rounded once), the model not mutated."""
    lora = lora_layers(model)
    out = {}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B") or name.startswith("soft_prompt."):   # adapters are saved on their own
            continue
        if owner.endswith(".base") and owner[:-5] in lora:      # "x.base.weight" -> "x.weight"
            layer = lora[owner[:-5]]
            if leaf == "weight" and not layer.merged:
                t = layer.merged_weight()
            name = f"{owner[:-5]}.{leaf}"
        out[hf_name(model, name)] = (t.t() if is_transposed(model, name) else t).detach().contiguous().cpu()
    return out


def save_model(model: nn.Module, out_dir) -> Path:
    """config.json + model.safetensors in Hugging Face layout (transformers loads it as is), each written atomically."""
    out = Path(out_dir)
    hf = model.config.to_hf()
    hf["torch_dtype"] = hf["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").unlink(missing_ok=True)   # an old sharded checkpoint would shadow ours
    write_json(out / "config.json", hf)
    return out
