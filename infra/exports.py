"""The files of an exported model beyond its weights, in the layouts other tools read: LoRA adapters as one
safetensors file with r and alpha in its metadata; a soft prompt as a PEFT prompt-tuning adapter directory
(adapter_model.safetensors {"prompt_embeddings": (n, C)} + adapter_config.json, so that
peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export), export / "soft_prompt") reads it too);
adapter_base.json, the weights a LoRA export's adapters belong on; the tokenizer files and a generation config."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from infra.files import CheckpointError, atomic_path, read_json, write_json
from infra.hub import copy_tokenizer_files, read_safetensors, resolve_model_dir, weights_digest


def write_lora(path, tensors: dict[str, torch.Tensor], r: int, alpha: float) -> None:
    """LoRA adapters {"<module>.lora_A": (r, in), "<module>.lora_B": (out, r)} as safetensors (atomic)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "r": str(r), "alpha": str(alpha)})


def write_prompt_adapter(out_dir, vectors: torch.Tensor, layers: int, heads: int, base: str | None) -> None:
    """Prompt vectors (n, C) as a PEFT prompt-tuning adapter directory (atomic)."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file({"prompt_embeddings": vectors.detach().cpu().contiguous()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", {
            "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": vectors.shape[0],
            "token_dim": vectors.shape[1], "num_transformer_submodules": 1, "num_attention_heads": heads,
            "num_layers": layers, "inference_mode": True,
            "prompt_tuning_init": "RANDOM",  # how PEFT would start a new prompt; loading takes the stored vectors
            "base_model_name_or_path": base})


def read_prompt_adapter(adapter_dir, width: int) -> torch.Tensor:
    """The prompt vectors (n, width) of a PEFT prompt-tuning adapter directory; any other shape is an error."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    vectors = read_safetensors(path).get("prompt_embeddings")
    if vectors is None or vectors.dim() != 2 or vectors.shape[1] != width:
        shape = None if vectors is None else tuple(vectors.shape)
        raise CheckpointError(f"{path}: expected 'prompt_embeddings' of shape (n, {width}), found {shape}")
    return vectors


ADAPTER_BASE = "adapter_base.json"


def note_adapter_base(out: Path, base, r: int, alpha: float, targets: str, run: Path | None = None) -> None:
    """Beside a LoRA export's adapter.safetensors (if it has one), the weights they were trained on and their digest
    (hub.weights_digest), checked before use; and the adapters' r, alpha and targets (read_adapter_base). A base
    inside the run directory `run` (the SFT model under DPO's adapters) is noted relative to it, so that a moved or
    copied run uses its own; another local directory by its absolute path, else the hub id."""
    if not (out / "adapter.safetensors").exists():
        return
    where, in_run = str(base), False
    if Path(base).exists():
        where = os.path.realpath(base)
        if run is not None and Path(where).is_relative_to(os.path.realpath(run)):
            where, in_run = os.path.relpath(where, os.path.realpath(run)), True
    write_json(out / ADAPTER_BASE, {"base": where, "in_run": in_run, "base_digest": weights_digest(
        resolve_model_dir(base)), "r": r, "alpha": alpha, "targets": targets})


def run_root(export: Path) -> Path | None:
    """The run directory an export lies in: its nearest parent holding run.json."""
    return next((p for p in Path(export).resolve().parents if (p / "run.json").is_file()), None)


def read_adapter_base(export) -> dict | None:
    """{"base", "r", "alpha", "targets"} of a LoRA export (note_adapter_base), None for any other directory. The
    base is checked: it must exist and hold the weights the adapters were trained on; a wrong entry is named."""
    noted = Path(export) / ADAPTER_BASE
    if not noted.exists():
        return None
    info = read_json(noted)
    kinds = {"base": (str, "a path or hub id"), "r": (int, "a whole number"), "alpha": ((int, float), "a number"),
             "targets": (str, "layer names such as q,v")}
    if wrong := [k for k, (t, _) in kinds.items() if not isinstance(info.get(k), t) or isinstance(info.get(k), bool)]:
        raise CheckpointError(f"{noted}: {wrong[0]!r} is {info.get(wrong[0])!r}; expected {kinds[wrong[0]][1]}")
    base = info["base"]
    if info.get("in_run"):
        root = run_root(export)
        if root is None:
            raise CheckpointError(f"{noted}: the base {base} lies in the run directory, but {export} is in no run "
                                  "(no run.json above it)")
        base = str(root / base)
    if "base_digest" in info:  # older exports noted no digest
        if not Path(base).exists() and (info.get("in_run") or Path(base).is_absolute()):
            raise CheckpointError(f"{noted}: the adapters' base {base} does not exist (moved or deleted?); put it "
                                  "back or run the stage again")
        now = weights_digest(resolve_model_dir(base))
        if now != info["base_digest"]:
            raise CheckpointError(f"{noted}: {base} holds other weights than the adapters were trained on (digest "
                                  f"{info['base_digest'][:12]} then, {now[:12]} now); restore them or run the stage "
                                  "again")
    return {**info, "base": base}


def complete_export(out: Path, base: Path, eos_ids: list[int], pad_id: int, max_new_tokens: int) -> None:
    """Make an exported model directory usable by other tools on its own: the base model's tokenizer files, and a
    generation_config.json that decodes greedily with these stop tokens and length."""
    copy_tokenizer_files(base, out)
    gen = read_json(base / "generation_config.json") if (base / "generation_config.json").is_file() else {}
    gen.update(do_sample=False, eos_token_id=list(eos_ids), pad_token_id=pad_id, max_new_tokens=max_new_tokens)
    write_json(out / "generation_config.json", gen)
