"""The files of an exported model beyond its weights, in the layouts other tools read: LoRA adapters as one
safetensors file with r and alpha in its metadata; a soft prompt as a PEFT prompt-tuning adapter directory
(adapter_model.safetensors {"prompt_embeddings": (n, C)} + adapter_config.json, so that
peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export), export / "soft_prompt") reads it too);
adapter_base.json, the weights a LoRA export's adapters belong on; the tokenizer files and a generation config."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from infra.files import CheckpointError, atomic_path, read_json, write_json
from infra.hub import copy_tokenizer_files, read_safetensors


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


def note_adapter_base(out: Path, base, r: int, alpha: float, targets: str) -> None:
    """Beside a LoRA export's adapter.safetensors (if it has one), the weights they were trained on: a local directory
    by its absolute path, else the hub id; and the adapters' r, alpha and targets (read_adapter_base)."""
    if (out / "adapter.safetensors").exists():
        where = str(Path(base).resolve()) if Path(base).exists() else str(base)
        write_json(out / ADAPTER_BASE, {"base": where, "r": r, "alpha": alpha, "targets": targets})


def read_adapter_base(export) -> dict | None:
    """{"base", "r", "alpha", "targets"} of a LoRA export (note_adapter_base), None for any other directory."""
    noted = Path(export) / ADAPTER_BASE
    return read_json(noted) if noted.exists() else None


def complete_export(out: Path, base: Path, eos_ids: list[int], pad_id: int, max_new_tokens: int) -> None:
    """Make an exported model directory usable by other tools on its own: the base model's tokenizer files, and a
    generation_config.json that decodes greedily with these stop tokens and length."""
    copy_tokenizer_files(base, out)
    gen = read_json(base / "generation_config.json") if (base / "generation_config.json").is_file() else {}
    gen.update(do_sample=False, eos_token_id=list(eos_ids), pad_token_id=pad_id, max_new_tokens=max_new_tokens)
    write_json(out / "generation_config.json", gen)
