"""Options declared once, as dataclass fields with their type or choices and their range; the command-line flags and
the range checks both come from that one declaration."""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from infra.files import read_json


def option(default, kind, help_text: str, low=None, high=None, above=None):
    """A dataclass field that is also a command-line option. kind: its type, or a tuple of allowed values;
    low <= value <= high, value > above: the range check_declared enforces."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help_text, "low": low, "high": high,
                                                        "above": above})


def flag(name: str) -> str:
    """The command-line flag of field `name`: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")


def check_declared(cfg) -> None:
    """Each field of the dataclass instance `cfg` against its declared choices, type and range (None: not given);
    the first problem raises one ValueError naming the flag."""
    for f in dataclasses.fields(cfg):
        value, kind, m = getattr(cfg, f.name), f.metadata["kind"], f.metadata
        if value is None:
            continue
        if isinstance(kind, tuple):
            if value not in kind:
                raise ValueError(f"{flag(f.name)} {value!r}: choose from {', '.join(kind)}")
            continue
        if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
            raise ValueError(f"{flag(f.name)} {value!r}: expected {kind.__name__}")
        if kind in (int, float) and not math.isfinite(value):  # NaN passes every comparison below; inf too
            raise ValueError(f"{flag(f.name)} {value}: must be a finite number")
        if m["low"] is not None and value < m["low"] or m["high"] is not None and value > m["high"]:
            bounds = f"at least {m['low']}" if m["high"] is None else f"between {m['low']} and {m['high']}"
            raise ValueError(f"{flag(f.name)} {value}: must be {bounds}")
        if m["above"] is not None and value <= m["above"]:
            raise ValueError(f"{flag(f.name)} {value}: must be above {m['above']}")


def add_flags(parser: argparse.ArgumentParser, cls, aliases: dict[str, str] | None = None) -> None:
    """One flag per field of dataclass `cls`, defaulting to None (so that "not given" can be told from a value);
    aliases: {field: another flag for it}."""
    for f in dataclasses.fields(cls):
        kind, help_text = f.metadata["kind"], f"{f.metadata['help']} (default {f.default})"
        flags = [flag(f.name)] + ([aliases[f.name]] if aliases and f.name in aliases else [])
        if isinstance(kind, tuple):
            parser.add_argument(*flags, dest=f.name, choices=kind, default=None, help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, type=kind, default=None, help=help_text)


def check_precision(precision: str, device_type: str, trainable: dict, warn=print) -> None:
    """Can `precision` ("fp32" | "bf16" | "fp16": autocast) train these parameters ({name: tensor}) on this device?
    fp16 loss scaling needs fp32 trainable weights and a GPU; bf16 on a CPU without bf16 units only warns."""
    fp16 = [n for n, p in trainable.items() if p.dtype == torch.float16]
    if precision == "fp16" and fp16:  # GradScaler raises "Attempting to unscale FP16 gradients"
        raise ValueError(f"precision='fp16' (loss scaling) needs fp32 trainable weights, but {len(fp16)} are fp16 "
                         f"(e.g. {fp16[0]}): keep the weights in fp32 (dtype fp32; autocast still computes in fp16), "
                         "or train LoRA adapters kept in fp32 on the fp16 base")
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("precision='fp16' needs a GPU; use 'bf16' on CPU")
    if (precision == "bf16" and device_type == "cpu"  # without them oneDNN converts bf16 GEMMs
            and not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())):
        warn("warning: this CPU has no bf16 matrix instructions (no AVX512-BF16 / AMX): bf16 autocast matmuls run "
             "~10x slower than fp32 here. precision='fp32' is the fast choice.")


def load_declared(cls, path: Path, overrides: dict, retired=()):
    """An instance of dataclass `cls` from the JSON object saved at `path` (if any), with the options given now
    (`overrides`, None: not given) on top. A saved key `cls` does not declare is refused, naming the file, unless
    it is one of the `retired` options (dropped: an option that no longer exists)."""
    saved = {k: v for k, v in (read_json(path) if path.exists() else {}).items() if k not in retired}
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(saved) - known:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    return cls(**{**saved, **{k: v for k, v in overrides.items() if v is not None and k in known}})
