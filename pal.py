"""PAL, the pipeline: Persona-aware Learning (mixed-task SFT), Persona Alignment (DPO), Select then Generate.

The flow. From PERSONA-CHAT's Train split PAL builds mixed-task features: for every example a persona-selection
prompt (which persona sentence should the reply build on? the target names it) and a persona-enhanced generation
prompt (reply, with the gold persona sentence highlighted), interleaved. SFT on them is Persona-aware Learning
(stage sft). The SFT model then answers each Valid#1 example from a history-only prompt, without any persona
(stage pairs): its persona-less replies are the rejected side of the preference pairs, the gold responses the
chosen side. DPO (beta 0.1) on those pairs, with the SFT model as the frozen reference, is Persona Alignment
(stage dpo), early-stopped on the score of Select-then-Generate replies to Valid#2. Select then Generate, PAL's
inference, first asks the model for the persona sentence, then generates with the model's own pick highlighted
(stage predict, on Test); evaluate scores the replies (BLEU-1/2, ROUGE-L, Entropy, C.score) into results.json.

    python pal.py sft      --run-dir R --model DIR --data-dir D    # 1. mixed-task SFT on Train
    python pal.py pairs    --run-dir R                             # 2. persona-less responses on Valid#1
    python pal.py dpo      --run-dir R                             # 3. DPO: gold response > persona-less one
    python pal.py predict  --run-dir R                             # 4. Select then Generate on Test
    python pal.py evaluate --run-dir R [--nli DIR]                 # 5. BLEU / ROUGE-L / Entropy / C.score
    python pal.py all      --run-dir R ...                         # 1-5 in order
    python pal.py chat     --run-dir R                             # talk to the trained model
    python pal.py table    R1 R2 ... [--paper]                     # runs in the paper's table layout

Every stage writes into one run directory and skips work that is already complete; an interrupted stage
resumes (training from its last checkpoint, generation after the last line written). The options given to the
first stage are stored in R/run.json and reused by the later ones (an option given again overrides it).

Read top to bottom:
  1. Select then Generate  select_then_generate: the selection prompt, its answer parsed, the reply prompt
  2. stages                sft -> pairs -> dpo -> predict -> evaluate, each a function of (options, run directory)
  3. variants and options  every row of the paper's tables as switches; RunConfig, every option of a run
  4. chat and table
  5. metrics               BLEU-n, ROUGE-L, n-gram entropy, Distinct-n, lexical persona coverage (C.score: nli.py);
                           diagnostics of parroting and of the selection step
  6. command line          which options shape which stage, and main (the lock, records and ranks are infra/)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import random
import re
import shutil
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
import dpo
import model as modeling
import nli
from infra import exports, rundir
from infra.dist import barrier, gather_rows, is_rank0, local_device, rank_world, sum_across, world_size
from infra.dist import rank_world as ranks  # noqa: F401 (the name ../shared/tools/gpu_check.sh calls)
from infra.dist import start as start_ranks
from infra.dist import stop as stop_ranks
from infra.dist import write_rows_shared
from infra.files import JsonlWriter, atomic_path, read_json, read_jsonl, write_json, write_text
from infra.hub import resolve_model_dir, weights_digest
from infra.options import add_flags, check_declared, flag, load_declared, option


def say(msg: str):
    if is_rank0():  # under torchrun one voice is enough
        print(f"[pal] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# 1. Select then Generate
# ----------------------------------------------------------------------------------------------------------

def select_then_generate(model, tok, examples: list, lang: str, *, strategy: str = "select", mode: str = "generate",
                         max_len: int = 512, max_new_tokens: int = 48, select_max_new_tokens: int = 48,
                         batch: int = 16, seed: int = 0, desc: str = "predict", prefix: list[int] = (),
                         shots: list[tuple[str, str]] = (), select_mode: str = "select",
                         writer: JsonlWriter | None = None) -> list[dict]:
    """PAL's inference for each example: 1. the model picks the persona sentence the reply should use
    (selection prompt), 2. it replies with *that* sentence highlighted. Never the gold label.
    strategy "random" highlights a random persona sentence, "none" highlights nothing (Not Select).
    prefix: ids before every prompt (a soft prompt's virtual ids); shots: few-shot demonstrations before the
    reply prompt (prompt_context gives both); select_mode: the selection prompt, asking for a number ("select")
    or for the sentence ("select_sentence", data.SELECT_MODES). With a writer, rows it already holds are kept and
    the remaining examples are appended to it."""
    rows = list(writer.done_rows) if writer else []
    todo = examples[len(rows):]
    stats = data.EncodeStats()  # history dropped and prompts cut to fit max_len, said below
    # 1. selection: greedy decoding of the selection prompt, parsed back to one of the persona sentences
    picks = None
    if strategy == "select" and mode == "generate":
        room = max_len - select_max_new_tokens - len(prefix)  # oldest history turns are dropped beyond this
        ids = [list(prefix) + data.encode_generation_prompt(tok, e, select_mode, lang, max_len=room, stats=stats)[0]
               for e in todo]
        picks = generate_texts(model, tok, ids, select_max_new_tokens, batch, f"{desc}: select")
        selected = [data.parse_selection(t, e.personas, lang) for t, e in zip(picks, todo)]
    elif strategy == "random":  # one draw per example, seeded by the example: a resumed or sharded run picks alike
        selected = [random.Random(f"{seed}:{e.dialogue_id}:{len(e.history)}").choice(e.personas) if e.personas
                    else None for e in todo]
    else:
        selected = [None] * len(todo)
        mode = "personas" if mode == "generate" else mode  # Not Select: the persona list, nothing highlighted
    # 2. generation with the selected persona highlighted
    room = max_len - max_new_tokens - len(prefix)
    ids = [list(prefix) + data.encode_generation_prompt(tok, e, mode, lang, persona=p, max_len=room, shots=shots,
                                                        stats=stats)[0] for e, p in zip(todo, selected)]
    if todo and (desc != "validate" or stats.truncated or stats.cut):  # validation: only when something was lost
        say(f"{desc}: prompts {stats.summary()}")

    def write(idx, texts):
        for i, t in zip(idx, texts):
            e = todo[i]
            row = {"dialogue_id": e.dialogue_id, "personas": e.personas, "history": e.history,
                   "selection_output": picks[i] if picks else None, "selected_persona": selected[i],
                   "response": t, "gold": e.response,
                   "gold_persona": e.personas[e.persona_label] if e.persona_label is not None else None}
            rows.append(row)
            if writer:
                writer.write(row)

    generate_texts(model, tok, ids, max_new_tokens, batch, f"{desc}: generate", on_batch=write)
    return rows


def generate_texts(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, batch: int,
                   desc: str = "generate", on_batch=None) -> list[str]:
    """Greedy replies for many prompts, `batch` at a time in the input order (so a resumed run continues after
    the last batch written). on_batch(indices, texts) runs after each batch, for incremental writing."""
    out = []
    bar = tqdm(total=len(prompt_ids), desc=desc, disable=len(prompt_ids) < 2 * batch, dynamic_ncols=True)
    for lo in range(0, len(prompt_ids), batch):
        new = modeling.generate(model, prompt_ids[lo:lo + batch], max_new_tokens, tok.stop_ids)
        texts = [tok.decode(t).strip() for t in new]
        if on_batch:
            on_batch(range(lo, lo + len(texts)), texts)
        out += texts
        bar.update(len(texts))
    bar.close()
    return out


def prompt_mode(fmt: str) -> str:
    """The prompt mode of replies at inference: PAL's persona-enhanced prompt (select_then_generate drops the
    highlight when its strategy picks no persona), or plain lines (ft)."""
    return "noprompt" if fmt == "plain" else "generate"


def training_prompt(switches: dict) -> str:
    """The prompt of replies in training (DPO pairs, w/o PC's SFT): PAL's persona-enhanced prompt with the gold
    persona highlighted (only DG too); the persona list alone for generation from the list (tasks "gen": +Prompting,
    only_dg_list: nothing selects a persona to highlight, at training or at inference); plain lines for ft."""
    if switches["fmt"] == "plain":
        return "noprompt"
    return "personas" if switches["tasks"] == "gen" else "generate"


def decoding(cfg: RunConfig) -> dict:
    """A run's generation settings, as select_then_generate's keyword arguments."""
    return dict(strategy=cfg.switches()["strategy"], mode=prompt_mode(cfg.switches()["fmt"]), max_len=cfg.max_len,
                max_new_tokens=cfg.max_new_tokens, select_max_new_tokens=cfg.select_max_new_tokens,
                batch=cfg.gen_batch, seed=cfg.seed, select_mode=data.SELECT_MODES[cfg.select_target])


def prompt_context(cfg: RunConfig, model, tok, splits: dict, lang: str) -> dict:
    """What comes before each inference prompt, as select_then_generate's keyword arguments: the soft prompt's
    virtual ids (a prompt-tuned model) and the few-shot demonstrations (--shots Train dialogues, one turn of each,
    drawn once with the seed, the same for every prompt: data.demonstrations). The demonstrations may take half of
    a prompt's room at most: beyond that the example's own personas would not fit."""
    k = cfg.switches()["shots"]
    dialogues = len({e.dialogue_id for e in splits["train"]})
    if k > dialogues:
        raise ValueError(f"--shots {k}: there are only {dialogues} Train dialogues to draw demonstrations from")
    shots = data.demonstrations(splits["train"], k, cfg.seed, lang)
    size = len(data.encode_prompt(tok, "", shots)) - len(data.encode_prompt(tok, ""))
    room = cfg.max_len - cfg.max_new_tokens
    if size > room // 2:
        raise ValueError(f"--shots {k}: the demonstrations take {size} tokens, more than half of the {room} a prompt "
                         f"has (--max-len {cfg.max_len}); give fewer shots or a larger --max-len")
    return dict(prefix=modeling.soft_prompt_ids(model), shots=shots)


# ----------------------------------------------------------------------------------------------------------
# 2. Stages
# ----------------------------------------------------------------------------------------------------------

# ---- what the stages share: the data, the tokenizer, the model a stage trains or generates with

def load_data(data_dir: str | None, limit: int | None = None, labels: str = "lexical", nli_model=None,
              lang: str | None = None, personas: str | None = None,
              history_turns: int | None = None, run: Path | None = None) -> tuple[dict, str]:
    """(splits, lang): the four splits of the paper's Table 1 with persona labels, lexical (data.py) or, with
    labels="nli", the NLI classifier's entailment labels (nli.nli_persona_labels). personas="revised": Train and
    Valid from the revised persona files, Test original (the paper). history_turns=K: the last K utterances only.
    run: the bytes parsed must be those the run's stages recorded (infra/rundir.py)."""
    if data_dir is None:
        raise ValueError("no data: give --data-dir (a PERSONA-CHAT directory; `python extras/download.py` fetches it)")
    splits, info = data.load_splits(data_dir, limit=limit, personas=personas)
    splits = {k: data.last_turns(v, history_turns) for k, v in splits.items()}
    if run is not None:
        rundir.check_parsed(run, {f: d for stats in info.stats.values() for f, d in stats.sha256.items()})
    say(info.message)
    for kind, stats in info.stats.items():  # what the parser met: counts, and the first few with file:line
        say(f"{kind}: {stats.report()}")
    if labels == "nli":
        if nli_model is None:
            raise ValueError("--labels nli needs --nli (an NLI checkpoint for nli.load_nli)")
        splits = {k: data.relabel(v, nli.nli_persona_labels(v, nli_model.predict)) for k, v in splits.items()}
    elif labels != "lexical":
        raise ValueError(f"--labels {labels!r}: choose lexical or nli")
    return splits, lang or decide_lang(splits)


def decide_lang(splits: dict) -> str:
    """The language of prompts and metrics, by share: 'zh' when most examples hold CJK characters; said."""
    every = [e for rows in splits.values() for e in rows]
    lang = data.detect_lang(every)
    say(f"language: {lang} ({data.cjk_share(every):.0%} of {len(every)} examples hold CJK characters; --lang "
        "overrides)")
    return lang


def run_data(cfg: RunConfig, run: Path | None = None) -> tuple[dict, str]:
    nli_model = load_nli(cfg.nli) if cfg.labels == "nli" else None  # the classifier is loaded only to label
    splits, lang = load_data(cfg.data_dir, cfg.limit, cfg.labels, nli_model, cfg.lang, cfg.personas,
                             cfg.history_turns, run)
    if stage_runs(cfg, "dpo") and cfg.eval_limit and not splits["valid2"]:  # said before SFT, not after it
        raise ValueError(f"no Valid#2 examples in {cfg.data_dir}: the second stage validates and stops early on "
                         "Valid#2; give data with more validation dialogues, or --eval-limit 0 to train without "
                         "validation")
    return splits, lang


def load_nli(name_or_path: str | None):
    return nli.load_nli(name_or_path, device=local_device()) if name_or_path else None


def load_tokenizer(name_or_path: str) -> data.Tokenizer:
    """The tokenizer of the base model (the vocabulary never changes), refused when it has ids the model's
    embedding lacks (they would index past it mid-run)."""
    tok = data.load_tokenizer(resolve_model_dir(name_or_path))
    data.check_tokenizer_fits(tok, modeling.read_config(name_or_path).vocab_size)
    return tok


def nonempty(rows: list, what: str) -> list:
    """`rows`, or an error: zero examples would train nothing and score a table of zeros that looks like a result."""
    if not rows:
        raise ValueError(f"no {what}")
    return rows


def load_stage_model(weights, dtype: str, lora: tuple | None = None, trainable: bool = False, seed: int = 0):
    """A model directory (the base, or a stage's exported weights) in `dtype`, for generation or, with
    trainable=True, for training: fresh LoRA adapters (lora = (r, alpha, dropout, "q,v,...", A's init)) or every
    weight."""
    if isinstance(weights, Path) and not weights.exists():  # a stage's output, not a base model
        raise FileNotFoundError(f"{weights} does not exist: run the stage that writes it first (`pal.py all` runs "
                                "every stage in order)")
    m = modeling.load_model(weights, dtype=DTYPES[dtype], device=local_device())
    if trainable and lora:
        modeling.add_lora(m, r=lora[0], alpha=lora[1], dropout=lora[2], targets=lora[3].split(","), seed=seed,
                          init=lora[4])
    elif trainable:
        m.requires_grad_(True)
    return m


def lora_rank(cfg: RunConfig, stage: str) -> int:
    """The LoRA rank of a training stage (0: every weight trains)."""
    return cfg.dpo_lora_r if stage == "dpo" and cfg.dpo_lora_r is not None else cfg.lora_r


def trainable_model(cfg: RunConfig, weights, stage: str = "sft", prompt_init: list[int] = ()):
    """The model a training stage updates: every weight, fresh LoRA adapters, the adapters of a LoRA export
    (continued_adapters), or (prompt tuning, SFT only) a soft prompt started from the embeddings of `prompt_init`
    with every weight frozen."""
    if stage == "sft" and cfg.switches()["tune"] == "prompt":
        m = load_stage_model(weights, cfg.dtype)
        modeling.add_soft_prompt(m, cfg.prompt_tokens, list(prompt_init))
        return m
    r = lora_rank(cfg, stage)
    if continued_adapters(cfg, weights, stage):
        noted = exports.read_adapter_base(weights)
        m = load_stage_model(noted["base"], cfg.dtype)
        modeling.add_lora(m, r=noted["r"], alpha=noted["alpha"], dropout=cfg.lora_dropout,
                          targets=noted["targets"].split(","))
        modeling.load_lora(m, weights / "adapter.safetensors")  # add_lora left them (and only them) trainable
        return m
    return load_stage_model(weights, cfg.dtype, (r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                                                 cfg.lora_init) if r else None, trainable=True, seed=cfg.seed)


def continued_adapters(cfg: RunConfig, weights, stage: str) -> bool:
    """Does the DPO stage go on training the LoRA adapters its start weights were exported with (the SFT model's,
    on their base: the model that wrote the pairs, unrounded), rather than fresh ones on the merged export?"""
    noted = exports.read_adapter_base(weights) if isinstance(weights, Path) and weights.exists() else None
    return stage == "dpo" and cfg.dpo_adapters == "continue" and noted is not None and lora_rank(cfg, "dpo") > 0


def generation_model(cfg: RunConfig, weights):
    """The model a stage generates with. A LoRA stage's output is rebuilt as it was validated: its base weights plus
    the fp32 adapters, unmerged (merging rounds W + BA to the base dtype once, and in bf16 a DPO delta at lr 1e-6
    rounds away); a prompt-tuned one gets its soft prompt; anything else is loaded as it is."""
    noted = exports.read_adapter_base(weights) if isinstance(weights, Path) else None
    if noted is None:
        m = load_stage_model(weights, cfg.gen_dtype or cfg.dtype)
        if isinstance(weights, Path) and (weights / modeling.SOFT_PROMPT_DIR).is_dir():  # a prompt-tuned run
            modeling.load_soft_prompt(m, weights / modeling.SOFT_PROMPT_DIR)
        return m
    m = load_stage_model(noted["base"], cfg.gen_dtype or cfg.dtype)
    modeling.add_lora(m, r=noted["r"], alpha=noted["alpha"], targets=noted["targets"].split(","))
    modeling.load_lora(m, weights / "adapter.safetensors")
    return m.eval()


def in_generation_dtype(m: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
    """The model under training as predict will rebuild it: weights in --gen-dtype, LoRA adapters fp32 (a copy when
    the dtypes differ, so that DPO's validation picks the checkpoint on the replies predict will give)."""
    dtype = DTYPES[cfg.gen_dtype or cfg.dtype]
    if dtype == DTYPES[cfg.dtype]:
        return m
    g = copy.deepcopy(m)
    for name, p in g.named_parameters():
        if "lora_" not in name:  # the adapters stay fp32, as generation_model loads them
            p.data = p.data.to(dtype)
    return g


def note_adapter_base(out: Path, base, cfg: RunConfig, stage: str = "sft", run: Path | None = None):
    """Beside a LoRA stage's adapters, the weights they were trained on (generation_model rebuilds from both).
    Continued adapters belong on the base of the adapters they continue."""
    if continued_adapters(cfg, base, stage):
        noted = exports.read_adapter_base(base)
        exports.note_adapter_base(out, noted["base"], noted["r"], noted["alpha"], noted["targets"], run)
        return
    exports.note_adapter_base(out, base, lora_rank(cfg, stage), cfg.lora_alpha, cfg.lora_targets, run)


def complete_export(out: Path, cfg: RunConfig, tok: data.Tokenizer):
    """An exported model usable by other tools on its own: the tokenizer files, and a generation config that
    decodes as this pipeline does (greedy, its stop tokens, --max-new-tokens)."""
    exports.complete_export(out, resolve_model_dir(cfg.model), tok.stop_ids, tok.pad_id, cfg.max_new_tokens)


def sft_weights(cfg: RunConfig, run: Path):
    """Where the second stage starts: the SFT model, or the base model for a variant without SFT."""
    return cfg.model if cfg.switches()["tasks"] == "none" else run / "sft" / "final"


def final_weights(cfg: RunConfig, run: Path):
    """The weights predict and chat use: the aligned model, or the stage before it when there is no alignment;
    with --from-run, that run's (same base model: the tokenizer comes from it)."""
    if cfg.from_run:
        source = Path(cfg.from_run)
        if source.resolve() == run.resolve():
            raise ValueError(f"--from-run {source}: that is this run; name the run that trained the model")
        trained = load_run_config(source, {})
        if trained.from_run:  # a chain of inference-only runs (or a loop): name the run that trained
            raise ValueError(f"--from-run {source}: that run trained nothing either (its --from-run is "
                             f"{trained.from_run}); name the run that trained the model")
        if trained.model != cfg.model:
            raise ValueError(f"--from-run {source}: trained from {trained.model}, this run's --model is {cfg.model}")
        return final_weights(trained, source)
    return sft_weights(cfg, run) if cfg.switches()["align"] == "none" else run / "dpo" / "final"


# ---- 1. sft ------------------------------------------------------------------------------------------------

def stage_sft(cfg: RunConfig, run: Path):
    """Persona-aware Learning: mixed-task SFT on Train (selection + persona-enhanced generation)."""
    out = run / "sft" / "final"
    if cfg.switches()["tasks"] == "none":
        say("sft: this variant has no SFT; the later stages start from the base model")
        return None
    splits, lang = run_data(cfg, run)
    tok = load_tokenizer(cfg.model)
    collate = lambda fs: data.collate_sft(fs, tok.pad_id)
    weights = cfg.model
    phases = sft_phases(cfg.switches()["tasks"], cfg.switches()["fmt"], data.SELECT_MODES[cfg.select_target])
    for k, (name, modes) in enumerate(phases):
        phase_dir = run / "sft" / f"phase{k}-{name}"
        if not (phase_dir / "final").exists():
            train = nonempty(splits["train"], f"Train examples in {cfg.data_dir}")
            say(f"sft phase {k} ({name}): tasks {modes} on {len(train)} Train examples")
            model = trainable_model(cfg, weights, prompt_init=soft_prompt_init(tok, lang))
            prefix = modeling.soft_prompt_ids(model)  # +Prompting: the soft prompt's ids before every sequence
            if prefix:
                say(f"prompt tuning: {len(prefix)} trainable vectors before every prompt, every weight frozen")
            room = cfg.max_len - len(prefix)
            if len(modes) == 2:  # PAL's two tasks, interleaved
                feats, stats = data.mixed_task_features(tok, splits["train"], cfg.select_ratio, cfg.seed, lang,
                                                        room, cfg.select_none_ratio, modes[0])
            else:
                feats, stats = data.sft_features(tok, splits["train"], modes[0], lang, room)
            say(f"SFT features ({'+'.join(modes)}): {stats.summary()}")
            feats = with_prefix(nonempty(feats, f"SFT features fit --max-len {cfg.max_len} ({stats.summary()})"),
                                prefix)
            # validation, once per epoch: the summed NLL of the phase's last task on Valid#1 + Valid#2
            val = (splits["valid1"] + splits["valid2"])[: cfg.eval_limit]
            val_feats = with_prefix(data.sft_features(tok, val, modes[-1], lang, room)[0] if val else [], prefix)
            tcfg = train_config(cfg, "sft", phase_dir, len(feats))
            if val_feats:
                tcfg.eval_every = max(1, math.ceil(len(feats) / global_batch(cfg)))
            eval_fn = (lambda m: validation_nll(m, val_feats, collate, cfg.batch_size, cfg.logps == "chunked")
                       if val_feats else None)
            dpo.train(model, tcfg, feats, collate, eval_fn=eval_fn,
                      export_files=lambda d: note_adapter_base(d, weights, cfg, run=run))
            del model
        weights = phase_dir / "final"
    if is_rank0():
        with atomic_path(out) as tmp:
            shutil.copytree(weights, tmp)
            complete_export(tmp, cfg, tok)
    return out


def sft_phases(tasks: str, fmt: str, select: str = "select") -> list[tuple[str, list[str]]]:
    """The SFT phases of a run: (name, prompt modes trained together); `select`: the selection task's prompt mode
    (data.SELECT_MODES). --tasks seq trains the two tasks one after the other instead of interleaved."""
    if tasks == "none":
        return []
    if fmt == "plain":
        return [("dg", ["noprompt"])]
    return {"mix": [("mix", [select, "generate"])], "dg": [("dg", ["generate"])], "gen": [("gen", ["personas"])],
            "ps": [("ps", [select])], "seq": [("ps", [select]), ("dg", ["generate"])]}[tasks]


def soft_prompt_init(tok, lang: str) -> list[int]:
    """Token ids whose embeddings start the prompt vectors: the reply prompt's own instructions (a task
    description, as Lester et al. found better than random vectors)."""
    return tok.encode(data.build_prompt("personas", [], [], lang))


def with_prefix(feats: list[dict], prefix: list[int]) -> list[dict]:
    """Features with `prefix` (a soft prompt's virtual ids) before every sequence, never a target."""
    if not prefix:
        return feats
    return [{**f, "input_ids": prefix + f["input_ids"], "labels": [data.IGNORE] * len(prefix) + f["labels"]}
            for f in feats]


def grad_accum(cfg: RunConfig, stage: str) -> int:
    """Micro-steps per optimizer step of a training stage (DPO may differ: the authors' Llama used 256 sequences
    per SFT step, 128 pairs per DPO step)."""
    return cfg.dpo_grad_accum if stage == "dpo" and cfg.dpo_grad_accum is not None else cfg.grad_accum


def global_batch(cfg: RunConfig, stage: str = "sft") -> int:
    """Sequences (pairs) per optimizer step over all torchrun ranks: what turns lengths and intervals given in
    examples or epochs into optimizer steps, so that 4 GPUs evaluate as often (in examples seen) as one."""
    return cfg.batch_size * grad_accum(cfg, stage) * world_size()


def train_config(cfg: RunConfig, mode: str, out_dir: Path, n_features: int) -> dpo.TrainConfig:
    """The run's options for one training stage, in dpo.train's terms (optimizer steps)."""
    common = dict(out_dir=str(out_dir), batch_size=cfg.batch_size, grad_accum=grad_accum(cfg, mode),
                  precision=cfg.precision, seed=cfg.seed, resume=True, save_every=cfg.save_every,
                  save_minutes=cfg.save_minutes, log_every=cfg.log_every, logps=cfg.logps,
                  lora_plus_ratio=cfg.lora_plus_ratio, grad_clip=cfg.grad_clip or None,
                  recompute=cfg.activations == "recompute",
                  group_by_length=True)  # batches of similar lengths: far less padding, the same exact resume
    if mode == "sft":
        lr = cfg.prompt_lr if cfg.switches()["tune"] == "prompt" else cfg.sft_lr
        return dpo.TrainConfig(mode="sft", epochs=cfg.sft_epochs, lr=lr, warmup_steps=cfg.sft_warmup,
                               sft_reduction=cfg.sft_reduction, eval_every=0, export_best=cfg.sft_keep == "best",
                               **common)
    steps = cfg.dpo_steps
    if cfg.dpo_epochs is not None:
        steps = max(1, math.ceil(cfg.dpo_epochs * n_features / global_batch(cfg, "dpo")))
    every = max(1, round(cfg.eval_every / global_batch(cfg, "dpo")))  # --eval-every counts examples
    return dpo.TrainConfig(mode="dpo", max_steps=steps, lr=cfg.dpo_lr, warmup_steps=cfg.dpo_warmup, beta=cfg.dpo_beta,
                           eval_every=min(every, steps), patience=cfg.patience, keep_steps=keep_steps(cfg), **common)


def keep_steps(cfg: RunConfig) -> tuple[int, ...]:
    """--keep-steps "50,100" as (50, 100)."""
    return tuple(int(s) for s in cfg.keep_steps.split(",")) if cfg.keep_steps else ()


def validation_nll(model, feats: list[dict], collate, batch_size: int, chunked: bool = False) -> dict:
    """Summed NLL per sequence on held-out features; score = its negative (higher is better). Under torchrun each
    rank scores every world-th feature and the sums are added up."""
    rank, world = rank_world()
    dev = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.no_grad():
        mine = feats[rank::world]
        for lo in range(0, len(mine), batch_size):
            b = collate(mine[lo:lo + batch_size])
            logps, _ = dpo.model_logps(model, b["input_ids"].to(dev), b["labels"].to(dev), chunked)
            total -= logps.sum().double()
    nll = sum_across(total).item() / max(len(feats), 1)
    return {"score": -nll, "val_nll": nll}


# ---- 2. pairs ----------------------------------------------------------------------------------------------

def stage_pairs(cfg: RunConfig, run: Path):
    """The SFT model answers each Valid#1 example from the history alone (no persona): the rejected side of
    PAL's preference pairs; the gold response is the chosen side."""
    out = run / "pairs.jsonl"
    splits, lang = run_data(cfg, run)
    nonempty(splits["valid1"], f"Valid#1 examples in {cfg.data_dir}")
    tok = load_tokenizer(cfg.model)
    model = generation_model(cfg, sft_weights(cfg, run))
    room = cfg.max_len - cfg.max_new_tokens

    def produce(examples: list, writer: JsonlWriter):
        todo = examples[len(writer.done_rows):]
        if writer.done_rows:
            say(f"pairs: resuming after {len(writer.done_rows)} of {len(examples)} examples")
        stats = data.EncodeStats()
        ids = [data.encode_generation_prompt(tok, e, "history", lang, max_len=room, stats=stats)[0] for e in todo]
        say(f"pairs: prompts {stats.summary()}")

        def write(idx, texts):
            for i, t in zip(idx, texts):
                e = todo[i]
                writer.write({"dialogue_id": e.dialogue_id, "personas": e.personas, "history": e.history,
                              "persona_label": e.persona_label, "chosen": e.response, "rejected": t})

        generate_texts(model, tok, ids, cfg.max_new_tokens, cfg.gen_batch, "pairs", on_batch=write)

    write_rows_shared(out, splits["valid1"], produce)
    return out


# ---- 3. dpo ------------------------------------------------------------------------------------------------

def stage_dpo(cfg: RunConfig, run: Path):
    """Persona Alignment: DPO from the SFT weights (reference = the SFT model) preferring the gold response
    over the persona-less one, early-stopped on the Valid#2 score. w/o PC: SFT on the gold responses instead."""
    align = cfg.switches()["align"]
    out = run / "dpo" / "final"
    if align == "none":
        say("dpo: this variant has no alignment stage; predict uses the SFT model (or the base model)")
        return None
    splits, lang = run_data(cfg, run)
    tok = load_tokenizer(cfg.model)
    mode = training_prompt(cfg.switches())
    policy = trainable_model(cfg, sft_weights(cfg, run), "dpo")
    # The reference is the SFT model. Full fine-tuning: a frozen copy of it. Fresh LoRA adapters on the SFT weights:
    # the policy with its adapters off. Continued SFT adapters: the policy as it starts, its log-probs cached
    # before the first step (switching the adapters off would leave the base model, the authors' reference).
    ref, continued = None, continued_adapters(cfg, sft_weights(cfg, run), "dpo")
    if align == "dpo" and not lora_rank(cfg, "dpo"):
        ref = load_stage_model(sft_weights(cfg, run), cfg.dtype)  # in the policy's dtype, not gen_dtype
    if continued:
        say("dpo: the SFT adapters go on training on their base; reference = base + SFT adapters, frozen")
    val = splits["valid2"][: cfg.eval_limit]
    if not val:
        say("dpo: --eval-limit 0: no validation; the last weights are exported")
    nli_model = load_nli(cfg.nli) if is_rank0() else None  # rank 0 scores the validation rows
    context = prompt_context(cfg, policy, tok, splits, lang)

    def eval_fn(m):  # every rank generates its share of Valid#2; rank 0 scores them all
        rank, world = rank_world()
        g = in_generation_dtype(m, cfg)  # GPT-2 presets: trained in fp32, predicted in fp16
        mine = select_then_generate(g, tok, val[rank::world], lang, desc="validate", **decoding(cfg), **context)
        rows = gather_rows(mine, len(val))
        return validation_score(rows, lang, nli_model) if rank == 0 else {"score": 0.0}  # rank 0's counts

    if align == "dpo":
        rows = nonempty(read_jsonl(run / "pairs.jsonl"), f"pairs in {run / 'pairs.jsonl'}")
        feats, stats = data.dpo_features(tok, [example_from_row(r) for r in rows], [r["rejected"] for r in rows],
                                         mode, lang, cfg.max_len)
        empty = sum(not r["rejected"].strip() for r in rows)  # the SFT model stopped at once: nothing to reject
        say(f"dpo: {len(feats)} pairs ({empty} of {len(rows)} with an empty rejected reply); {stats.summary()}")
        nonempty(feats, f"pairs fit --max-len {cfg.max_len} ({stats.summary()})")
        collate = lambda fs: data.collate_dpo(fs, tok.pad_id)
        tcfg = dataclasses.replace(train_config(cfg, "dpo", run / "dpo", len(feats)), reference_adapters=continued)
    else:  # w/o PC: the same Valid#1 examples, gold responses only, plain SFT
        feats = data.sft_features(tok, splits["valid1"], mode, lang, cfg.max_len)[0]
        collate = lambda fs: data.collate_sft(fs, tok.pad_id)
        tcfg = dataclasses.replace(train_config(cfg, "dpo", run / "dpo", len(feats)), mode="sft", lr=cfg.sft_lr)

    def export_files(d: Path):
        complete_export(d, cfg, tok)
        note_adapter_base(d, sft_weights(cfg, run), cfg, "dpo", run)

    dpo.train(policy, tcfg, feats, collate, eval_fn=eval_fn if val else None, ref_model=ref,
              export_files=export_files)
    return out


def example_from_row(row: dict) -> data.Example:
    return data.Example(personas=row["personas"], history=row["history"], response=row["chosen"],
                        persona_label=row.get("persona_label"), dialogue_id=row.get("dialogue_id", -1))


# ---- 4. predict, 5. evaluate -------------------------------------------------------------------------------

def stage_predict(cfg: RunConfig, run: Path):
    """Select then Generate on Test: generations.jsonl (personas, history, selected persona, response, gold)."""
    out = run / "generations.jsonl"
    splits, lang = run_data(cfg, run)
    nonempty(splits["test"], f"Test examples in {cfg.data_dir}")
    tok = load_tokenizer(cfg.model)
    model = generation_model(cfg, final_weights(cfg, run))
    context = prompt_context(cfg, model, tok, splits, lang)

    def produce(examples: list, writer: JsonlWriter):
        if writer.done_rows:
            say(f"predict: resuming after {len(writer.done_rows)} of {len(examples)} examples")
        select_then_generate(model, tok, examples, lang, writer=writer, **decoding(cfg), **context)

    write_rows_shared(out, splits["test"], produce)
    return out


def stage_evaluate(cfg: RunConfig, run: Path):
    """BLEU-1/2, ROUGE-L, Entropy, C.score (with --nli) and persona coverage -> results.json, results.md. The
    metrics are computed in both conventions, under results["metrics"]["default"] and ["authors"] (the paper's
    numbers came from the latter: authors_metrics); the top-level keys are the default ones and the diagnostics.
    The run's identity (model, dataset, persona version, row, seed and the options that shaped it) goes with them:
    pal.py table places the run in the paper's tables and groups runs that differ only by seed."""
    out = run / "results.json"
    rows = nonempty(read_jsonl(run / "generations.jsonl"), f"generated rows in {run / 'generations.jsonl'}")
    lang = cfg.lang or data.detect_lang([data.Example(r["personas"], r["history"], r["gold"], None, r["dialogue_id"])
                                         for r in rows])  # a run from before run.json kept the language
    res = score_generations(rows, lang, load_nli(cfg.nli))
    paper = {k: res[k] for k in CONVENTION_KEYS}
    res["metrics"] = {"default": paper, "authors": None if lang != "en" else  # they segment Chinese with jieba
                      {**authors_metrics([r["response"] for r in rows], [r["gold"] for r in rows]),
                       "c_score": res["c_score"]}}  # the NLI score has one convention: the authors'
    options = stage_options(cfg, "evaluate")
    res.update(variant=cfg.variant, model=cfg.model, **cfg.switches(), lang=lang, seed=cfg.seed,
               dataset=data_name(lang), personas=cfg.personas or "original",
               options={k: v for k, v in options.items() if k != "seed"})
    write_json(out, res)
    md = results_table([(run.name, res)])
    write_text(run / "results.md", md + "\n")
    print(md)
    return out


CONVENTION_KEYS = ("bleu1", "bleu2", "bleu4", "rouge_l", "entropy1", "entropy2", "entropy3", "entropy4", "entropy",
                   "distinct1", "distinct2", "c_score")  # what each metric convention holds in results.json


def data_name(lang: str) -> str:
    """The paper's name of a run's data: PERSONA-CHAT (Tables 2, 5) or Baidu-Persona-Chat (Table 3)."""
    return "Baidu-Persona-Chat" if lang == "zh" else "PERSONA-CHAT"


def score_generations(rows: list[dict], lang: str, nli_model=None) -> dict:
    """All metrics of a list of generation rows (response, gold, personas), in the project's default convention.
    BLEU/ROUGE-L x100 as in the paper's tables; entropy in nats. C.score only with an NLI classifier: otherwise
    None, never invented."""
    hyps, refs, personas = [r["response"] for r in rows], [r["gold"] for r in rows], [r["personas"] for r in rows]
    bleu = corpus_bleu(hyps, refs, max_n=4, lang=lang)
    res = {"n": len(rows), "bleu1": 100 * bleu[0], "bleu2": 100 * bleu[1], "bleu4": 100 * bleu[3],
           "rouge_l": 100 * rouge_l(hyps, refs, lang=lang)}
    for n in (1, 2, 3, 4):
        res[f"entropy{n}"] = ngram_entropy(hyps, n, lang=lang)
    res["entropy"] = res["entropy4"]  # the paper's "Entropy" column: 4-gram entropy
    res["persona_coverage"] = 100 * persona_coverage(hyps, personas, lang=lang)
    res.update(diagnostics(rows, lang))  # copy rate, length, Distinct-1/2, selection; and the same for gold
    # C.score: mean over replies of the max over their persona sentences (the paper's numbers), and of the sum
    # (Madotto et al. 2019); premise = persona sentence, hypothesis = reply, as the authors' evaluation code
    scores = nli.c_scores(hyps, personas, nli_model) if nli_model is not None else {}
    res.update(c_score=scores.get("c_score"), c_score_sum=scores.get("c_score_sum"))
    return res


def validation_score(rows: list[dict], lang: str, nli_model=None) -> dict:
    """The early-stopping score of a validation pass: C.score when an NLI model is given (as in the paper),
    else persona coverage + BLEU-1 - 100 x copy rate. Coverage alone rewards parroting: a reply that repeats a
    persona sentence covers it fully, and on SmolLM2 the checkpoint that copied most won (docs/measurements.md); a
    copied reply's coverage is taken back, and BLEU-1 keeps the replies close to what people answer."""
    s = score_generations(rows, lang, nli_model)
    lexical = s["persona_coverage"] + s["bleu1"] - 100 * s["copy_rate"]
    s["score"] = s["c_score"] if s["c_score"] is not None else lexical
    return s


# ----------------------------------------------------------------------------------------------------------
# 3. The variants, and the options of a run
# ----------------------------------------------------------------------------------------------------------

# What each variant changes. The switches:
#   tasks     SFT tasks: "mix" (persona selection + persona-enhanced generation, interleaved: PAL),
#             "dg" (persona-enhanced generation only, the gold persona highlighted: the paper's only DG),
#             "gen" (generation from the persona list, nothing highlighted, as at its inference: +Prompting),
#             "ps" (selection only), "seq" (selection, then generation), "none" (no SFT: the base model)
#   fmt       "prompt" (PAL's instruction prompts) or "plain" (personas and history as plain lines)
#   align     second stage: "dpo" (PAL), "sft" (SFT on Valid#1's gold responses: w/o PC), "none" (w/o PA)
#   strategy  inference: "select" (Select then Generate), "random" (a random persona is highlighted),
#             "none" (Not Select: the full persona list, nothing highlighted)
#   tune      what SFT trains: "weights" (all of them, or LoRA adapters with --lora-r) or "prompt" (prompt tuning:
#             --prompt-tokens vectors before every prompt, every weight frozen: the +Prompting baseline)
#   shots     Train dialogues, one turn each with its gold reply, shown before every reply prompt (few-shot)
# In the order of the result tables: the baselines and PAL (Table 2 / 3), then the ablations (Table 5).
SWITCH_DEFAULTS = dict(tune="weights", shots=0)
VARIANTS = {
    "zero_shot":  dict(tasks="none", fmt="prompt", align="none", strategy="none"),  # the base model, no training
    "few_shot":   dict(tasks="none", fmt="prompt", align="none", strategy="none", shots=2),  # two dialogues
    "ft":         dict(tasks="gen", fmt="plain", align="none", strategy="none"),   # fine-tuning w/o prompts
    "prompting":  dict(tasks="gen", fmt="prompt", align="none", strategy="none", tune="prompt"),  # prompt tuning
    "pal":        dict(tasks="mix", fmt="prompt", align="dpo", strategy="select"),
    "wo_mix":     dict(tasks="none", fmt="prompt", align="dpo", strategy="select"),  # no Persona-aware Learning
    "wo_pa":      dict(tasks="mix", fmt="prompt", align="none", strategy="select"),
    "wo_pc":      dict(tasks="mix", fmt="prompt", align="sft", strategy="select"),
    "only_dg":    dict(tasks="dg", fmt="prompt", align="dpo", strategy="select"),  # PAL without the PS task
    "only_ps":    dict(tasks="ps", fmt="prompt", align="dpo", strategy="select"),
    "random":     dict(tasks="mix", fmt="prompt", align="dpo", strategy="random"),
    "not_select": dict(tasks="mix", fmt="prompt", align="dpo", strategy="none"),
    # not a row of the paper: generation from the persona list (nothing highlighted) in SFT, DPO and inference
    "only_dg_list": dict(tasks="gen", fmt="prompt", align="dpo", strategy="none"),
}
SWITCHES = {"tasks": ("mix", "dg", "gen", "ps", "seq", "none"), "fmt": ("prompt", "plain"),
            "align": ("dpo", "sft", "none"), "strategy": ("select", "random", "none"), "tune": ("weights", "prompt"),
            "shots": int}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(DTYPES)


@dataclass
class RunConfig:
    """Everything a run depends on; stored in RUN_DIR/run.json by the first stage. Each field is the option
    --field-name of every stage; an option left out keeps run.json's value."""
    model: str | None = option(None, str, "model directory in Hugging Face layout, or a hub id "
                               "(`python extras/smol.py` makes SmolLM2's)")
    data_dir: str | None = option(None, str, "PERSONA-CHAT (ParlAI *_self_*.txt) or Baidu-Persona-Chat (*.jsonl) "
                                             "directory")
    variant: str = option("pal", tuple(VARIANTS), "baseline / ablation preset; the four switches default from it")
    tasks: str | None = option(None, SWITCHES["tasks"], "SFT tasks (overrides the variant)")
    fmt: str | None = option(None, SWITCHES["fmt"], "prompt format (overrides the variant)")
    align: str | None = option(None, SWITCHES["align"], "second stage (overrides the variant)")
    strategy: str | None = option(None, SWITCHES["strategy"], "inference strategy (overrides the variant)")
    tune: str | None = option(None, SWITCHES["tune"], "what SFT trains: weights, or a soft prompt (overrides the "
                              "variant)")
    shots: int | None = option(None, int, "few-shot: Train examples shown before each reply prompt at inference "
                               "(overrides the variant)", low=0)
    prompt_tokens: int = option(20, int, "prompt tuning: trainable vectors before each prompt", low=1)
    prompt_lr: float = option(3e-2, float, "prompt tuning: learning rate of the prompt vectors", above=0)
    lang: str | None = option(None, ("en", "zh"), "language of prompts and metrics (default: from the data)")
    limit: int | None = option(None, int, "examples per split (default: all)", low=1)
    personas: str | None = option(None, ("original", "revised"), "PERSONA-CHAT persona files: revised = Train and "
                                  "Valid revised, Test original, as the paper (default: the files present)")
    history_turns: int | None = option(None, int, "history utterances in a prompt, the latest (default: all)",
                                       low=0)
    labels: str = option("lexical", ("lexical", "nli"), "persona labels of the selection task (nli needs --nli)")
    seed: int = option(0, int, "seed of the data order, dropout and random persona picks")
    select_ratio: float = option(1.0, float, "share of Train examples that also get a selection feature", low=0, high=1)
    select_none_ratio: float = option(1.0, float, "share of the unlabelled ones (target: no persona) that keep it",
                                      low=0, high=1)
    max_len: int = option(512, int, "tokens per sequence; the oldest history turns are dropped beyond it", low=16)
    # model / precision
    dtype: str = option("fp32", PRECISIONS, "weights while training")
    precision: str = option("fp32", PRECISIONS, "training autocast")
    logps: str = option("plain", ("plain", "chunked"), "log-probs from the full logits (plain) or chunk by chunk "
                        "without them (chunked: less memory, dpo.py's appendix)")
    activations: str = option("keep", ("keep", "recompute"), "training keeps every block's activations for the "
                              "backward pass, or recomputes them there (less memory, about a third more compute)")
    lora_r: int = option(0, int, "LoRA rank; 0 = full fine-tuning", low=0)
    lora_alpha: float = option(16.0, float, "LoRA alpha", above=0)
    lora_dropout: float = option(0.05, float, "LoRA dropout", low=0, high=0.9)
    lora_targets: str = option("q,k,v,o,mlp", str, "layers LoRA wraps, comma-separated from q k v o mlp (GPT-2's "
                               "q, k and v are one matrix, c_attn); PEFT's defaults: q,v (Llama), q,k,v (GPT-2)")
    lora_init: str = option("kaiming", modeling.LORA_INITS, "LoRA A's init: nn.Linear's (kaiming) or N(0, 1/r^2) "
                            "(gaussian, the authors')")
    lora_plus_ratio: float = option(1.0, float, "LoRA+: the B matrices learn at this times the learning rate (1: "
                                    "off; the authors' 16)", above=0)
    dpo_adapters: str = option("continue", ("continue", "fresh"), "DPO after LoRA SFT: go on training the SFT "
                               "adapters on their base (the model that wrote the pairs) or fresh ones on the merged "
                               "SFT weights")
    grad_clip: float = option(1.0, float, "max gradient norm of a training step (0: no clipping; the authors' 10)",
                              low=0)
    dpo_lora_r: int | None = option(None, int, "LoRA rank of the DPO stage alone (default: --lora-r); the authors' "
                                    "GPT-2: full SFT, then DPO with LoRA", low=0)
    # SFT (paper: lr 2e-5, 100 warmup steps, 10 epochs)
    sft_lr: float = option(2e-5, float, "SFT learning rate", low=0)
    sft_epochs: float = option(10.0, float, "SFT epochs", above=0)
    sft_warmup: int = option(100, int, "SFT warmup steps", low=0)
    sft_reduction: str = option("sum", ("sum", "mean"), "SFT NLL summed per sequence (PAL) or per target token")
    sft_keep: str = option("last", ("last", "best"), "SFT result: the last epoch (the paper) or the best validated")
    batch_size: int = option(8, int, "sequences (pairs) per process and micro-step", low=1)
    grad_accum: int = option(1, int, "micro-steps per optimizer step", low=1)
    dpo_grad_accum: int | None = option(None, int, "micro-steps per DPO optimizer step (default: --grad-accum)",
                                        low=1)
    # DPO (paper: beta 0.1, 100 warmup steps, up to 30000 steps with early stopping)
    dpo_lr: float = option(5e-6, float, "DPO learning rate", low=0)
    dpo_beta: float = option(0.1, float, "DPO beta", above=0)
    dpo_steps: int = option(30000, int, "DPO optimizer steps", low=1)
    dpo_epochs: float | None = option(None, float, "DPO passes over the pairs (overrides --dpo-steps)", above=0)
    dpo_warmup: int = option(100, int, "DPO warmup steps", low=0)
    eval_every: int = option(5000, int, "DPO examples (over all ranks) between validations", low=1)
    patience: int = option(5, int, "validations without improvement before DPO stops", low=0)
    eval_limit: int = option(200, int, "validation examples generated for each early-stopping score", low=0)
    log_every: int = option(10, int, "optimizer steps between log lines (each one reads the GPU back)", low=1)
    save_every: int = option(0, int, "optimizer steps between training checkpoints (0: off)", low=0)
    save_minutes: float = option(10.0, float, "minutes between training checkpoints (0: off); a kill loses at most "
                                              "this much training", low=0)
    keep_steps: str | None = option(None, str, "DPO steps whose checkpoints are kept, comma-separated (e.g. "
                                    "50,100,150: Figure 4's sweep, extras/figures.py fig4)")
    # generation (greedy)
    max_new_tokens: int = option(48, int, "new tokens per reply", low=1)
    select_max_new_tokens: int = option(48, int, "new tokens of the selection step", low=1)
    gen_batch: int = option(16, int, "prompts per generation batch", low=1)
    gen_dtype: str | None = option(None, PRECISIONS, "weights for pairs/predict/chat (default: --dtype)")
    nli: str | None = option(None, str, "NLI checkpoint (directory or hub id) for C.score and DPO validation")
    from_run: str | None = option(None, str, "another run's trained model for predict and chat (inference-only "
                                  "variants: random, not_select); this run trains nothing")
    select_target: str = option("number", tuple(data.SELECT_MODES), "what the selection task answers: the "
                                "sentence's number, or the authors' \"k.sentence\" (\"No personal description.\")")

    def switches(self) -> dict:
        """The variant's switches, with each one given as an option on top."""
        base = {**SWITCH_DEFAULTS, **VARIANTS[self.variant]}
        return {k: base[k] if getattr(self, k) is None else getattr(self, k) for k in SWITCHES}


def load_run_config(run_dir: Path, overrides: dict) -> RunConfig:
    """run.json (if any) with the options given on this command line on top, checked by check_options. Nothing
    is written here: main saves run.json once every check has passed, so a refused call leaves it unchanged."""
    cfg = load_declared(RunConfig, run_dir / "run.json", overrides, retired=RETIRED)
    check_options(cfg)
    return cfg


def check_options(cfg: RunConfig):
    """Each option against its declared choices and range (infra/options.py), then the ones that depend on each
    other; the first problem raises, naming the option."""
    check_declared(cfg)
    soft = cfg.prompt_tokens if cfg.switches()["tune"] == "prompt" else 0
    for name in ("max_new_tokens", "select_max_new_tokens"):  # the prompt needs room in max_len
        if getattr(cfg, name) + soft >= cfg.max_len:
            extra = f" minus --prompt-tokens {soft}" if soft else ""
            raise ValueError(f"{flag(name)} {getattr(cfg, name)}: must be below --max-len {cfg.max_len}{extra}")
    if cfg.keep_steps and not all(s.strip().isdigit() and int(s) > 0 for s in cfg.keep_steps.split(",")):
        raise ValueError(f"--keep-steps {cfg.keep_steps}: expected positive step numbers separated by commas")
    if unknown := set(cfg.lora_targets.split(",")) - {"q", "k", "v", "o", "mlp"}:
        raise ValueError(f"--lora-targets {cfg.lora_targets}: unknown {sorted(unknown)}; choose from q,k,v,o,mlp")
    sw = cfg.switches()
    if sw["tune"] == "prompt" and (sw["tasks"] == "none" or sw["align"] != "none"):
        raise ValueError(f"--tune prompt: prompt tuning trains a soft prompt in the SFT stage and nothing after it; "
                         f"it needs SFT tasks (not --tasks {sw['tasks']}) and --align none (not {sw['align']})")
    if cfg.dpo_adapters == "continue" and cfg.lora_r and cfg.dpo_lora_r not in (None, 0, cfg.lora_r):
        raise ValueError(f"--dpo-lora-r {cfg.dpo_lora_r}: --dpo-adapters continue trains the SFT adapters (rank "
                         f"--lora-r {cfg.lora_r}) on; use one rank or --dpo-adapters fresh")
    if cfg.precision == "fp16" and cfg.dtype == "fp16" and not cfg.lora_r:  # loss scaling needs fp32 masters
        raise ValueError("--precision fp16 with --dtype fp16: fp16 loss scaling needs fp32 trainable weights; use "
                         "--dtype fp32 (autocast computes in fp16) or LoRA (--lora-r, adapters stay fp32)")


def check_model_fits(cfg: RunConfig):
    """--max-len within the model's positions (GPT-2 has no position beyond n_positions: a longer sequence would
    fail mid-run), read from the model's config.json before anything is trained."""
    positions = modeling.max_positions(modeling.read_config(cfg.model))
    if cfg.max_len > positions:
        raise ValueError(f"--max-len {cfg.max_len}: the model {cfg.model} has {positions} positions")


# ----------------------------------------------------------------------------------------------------------
# 4. Chat, and the paper's tables
# ----------------------------------------------------------------------------------------------------------

def stage_chat(cfg: RunConfig, run: Path, personas: list[str] | None = None, stream=None):
    """Talk to the trained model: type persona sentences (or press enter for a random Test persona), then chat.
    Each turn shows the persona sentence the model selected before its reply."""
    stream = stream or sys.stdin
    weights = final_weights(cfg, run)
    if isinstance(weights, Path) and not weights.exists():
        raise FileNotFoundError(f"{weights} does not exist: train first (python pal.py all --run-dir {run})")
    tok = load_tokenizer(cfg.model)
    model = generation_model(cfg, weights)
    lang, splits = cfg.lang or "en", None  # the data is read once, if the demonstrations or a persona need it
    if cfg.switches()["shots"]:
        splits, lang = run_data(cfg, run)
    if not personas:
        print("Persona sentences, one per line; an empty line ends (empty at once: a random Test persona).")
        personas = []
        for line in stream:
            if not line.strip():
                break
            personas.append(line.strip())
        if not personas and cfg.data_dir:
            splits, lang = (splits, lang) if splits else run_data(cfg)
            personas = random.Random().choice(splits["test"]).personas
    context = prompt_context(cfg, model, tok, splits or {"train": []}, lang)
    print("Persona:\n" + "\n".join(f"  - {p}" for p in personas) + "\n(empty line or Ctrl-D quits)")
    history: list[str] = []
    while True:
        print("you> ", end="", flush=True)
        line = stream.readline()
        if not line or not line.strip():
            break
        history.append(line.strip())
        ex = data.Example(personas=personas, history=list(history), response="", persona_label=None, dialogue_id=-1)
        row = select_then_generate(model, tok, [ex], lang, desc="chat", **decoding(cfg), **context)[0]
        print(f"   [persona: {row['selected_persona'] or '-'}]")
        print(f"bot> {row['response']}")
        history.append(row["response"])


TABLE_COLUMNS = [("BLEU-1", "bleu1"), ("BLEU-2", "bleu2"), ("ROUGE-L", "rouge_l"), ("Entropy", "entropy"),
                 ("C.score", "c_score"), ("Persona cov.", "persona_coverage"), ("Dist-2", "distinct2")]
PAPER_COLUMNS = TABLE_COLUMNS[:5]  # the columns of the paper's Tables 2, 3 and 5
# (header, key, format): fractions shown as percentages; "–" where a row has no such number
DIAGNOSTIC_COLUMNS = [("Copy %", "copy_rate", "pct"), ("Words", "words", ".1f"), ("Dist-1", "distinct1", ".3f"),
                      ("Dist-2", "distinct2", ".3f"), ("Persona cov.", "persona_coverage", ".1f"),
                      ("Same persona %", "same_persona", "pct"), ("No persona %", "no_persona", "pct"),
                      ("Selection acc. %", "select_acc", "pct")]


def _cell(value, fmt: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}" if fmt == "pct" else format(value, fmt)


ROW_NAMES = {"zero_shot": "(base model)", "few_shot": "+Few-Shot", "ft": "+FineTuning", "prompting": "+Prompting",
             "pal": "PAL", "wo_mix": "w/o Mix", "wo_pa": "w/o PA", "wo_pc": "w/o PC", "only_dg": "only DG",
             "only_ps": "only PS", "random": "Random", "not_select": "Not Select", "only_dg_list": "only DG (list)"}
# the rows of each of the paper's layouts, in the order printed
TABLE2_ROWS = ("zero_shot", "few_shot", "ft", "prompting", "pal")  # Table 2 (Table 3: Chinese), per model
TABLE5_ROWS = ("pal", "wo_mix", "wo_pa", "only_dg", "only_ps", "wo_pc")  # Table 5, the models as column groups
FIGURE3_ROWS = ("pal", "random", "not_select")  # Figure 3: Select then Generate against Random and Not Select
PAPER_MODELS = {"gpt2": "GPT-2", "dialogpt": "DialoGPT", "llama-3.1-8b": "Llama 3.1 8B",
                "gpt2-chinese": "GPT-2"}  # the start of a model's directory name -> its name in the paper
CONVENTIONS = {"default": "the project's default convention (lower-cased word and punctuation tokens, reply as "
                          "hypothesis)",
               "authors": "the paper's convention (the authors' decode.py: pycocoevalcap on whitespace tokens, gold "
                          "in the hypothesis' place)"}


def row_name(res: dict) -> str:
    """A run's row in the paper's words; a switch set against its variant is named after it."""
    variant = res.get("variant", "pal")
    preset = {**SWITCH_DEFAULTS, **VARIANTS.get(variant, {})}
    changed = [f"{k}={res[k]}" for k in SWITCHES if k in res and res[k] != preset.get(k)]
    return ROW_NAMES.get(variant, variant) + (f" ({', '.join(changed)})" if changed else "")


def paper_model(model) -> str | None:
    name = Path(str(model)).name.lower()
    return next((v for k, v in PAPER_MODELS.items() if name.startswith(k)), None)


def metrics_table(named: list[tuple[str, dict]]) -> str:
    """The paper's columns, one row per run (Model, Method, the metrics, and the run directory), default metric
    convention; C.score shows n/a without an NLI model."""
    lines = ["| Model | Method | " + " | ".join(c for c, _ in TABLE_COLUMNS) + " | Run |",
             "|---|---|" + "---:|" * len(TABLE_COLUMNS) + "---|"]
    for name, res in named:
        cells = ["n/a" if res.get(k) is None else f"{res[k]:.4f}" if k == "distinct2" else f"{res[k]:.2f}"
                 for _, k in TABLE_COLUMNS]
        model = Path(str(res.get("model"))).name or "?"
        lines.append(f"| {model} | {row_name(res)} | " + " | ".join(cells) + f" | {name} |")
    return "\n".join(lines)


def diagnostics_table(named: list[tuple[str, dict]]) -> str:
    """Copy rate, reply length, selection behaviour, with the gold responses of the first run's rows as the
    yardstick (selection accuracy of gold: by definition, so "–")."""
    lines = ["| Diagnostics | " + " | ".join(c for c, _, _ in DIAGNOSTIC_COLUMNS) + " |",
             "|---|" + "---:|" * len(DIAGNOSTIC_COLUMNS)]
    gold = {**named[0][1].get("gold", {}), "select_acc": None} if named else {}
    for name, res in [("gold responses", gold)] + named:
        lines.append(f"| {name} | " + " | ".join(_cell(res.get(k), f) for _, k, f in DIAGNOSTIC_COLUMNS) + " |")
    return "\n".join(lines)


def results_table(named: list[tuple[str, dict]]) -> str:
    return metrics_table(named) + "\n\n" + diagnostics_table(named)


# ---- significance: the paper's "*", an independent-samples t-test over the seeds of two rows

def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), on the side
    where it converges fast (x < (a + 1) / (a + b + 2); else 1 - I_{1-x}(b, a))."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d, tiny = 1.0, 1.0, 0.0, 1e-300
    for i in range(1000):  # terms d_i of 1 / (1 + d_1 / (1 + d_2 / (1 + ...))), d_0 = 1
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def t_test(a: list[float], b: list[float]) -> float:
    """Two-sided p-value of Student's independent-samples t-test with pooled variance, the paper's test of a row
    against the second best (three runs each): t = (mean_a - mean_b) / sqrt(s^2 (1/n_a + 1/n_b)), s^2 the pooled
    variance with df = n_a + n_b - 2 degrees of freedom, p = P(|T_df| >= |t|) = I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"t-test: needs two values or more on each side, got {na} and {nb}")
    ma, mb, df = math.fsum(a) / na, math.fsum(b) / nb, na + nb - 2
    s2 = (math.fsum((x - ma) ** 2 for x in a) + math.fsum((x - mb) ** 2 for x in b)) / df
    if s2 == 0.0:  # no spread on either side: the means differ for sure, or not at all
        return 1.0 if ma == mb else 0.0
    t = (ma - mb) / math.sqrt(s2 * (1 / na + 1 / nb))
    return betainc(df / 2, 0.5, df / (df + t * t))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    m = math.fsum(values) / len(values)
    return m, math.sqrt(math.fsum((x - m) ** 2 for x in values) / (len(values) - 1)) if len(values) > 1 else None


# ---- the paper's layouts

def seed_groups(named: list[tuple[str, dict]]) -> list[list[tuple[str, dict]]]:
    """Runs that differ only by --seed, together (the options that shaped a result, as evaluate recorded them,
    minus the seed; an older results.json without them is a group of its own)."""
    groups: dict[str, list] = {}
    for name, res in named:
        key = repr((row_name(res), sorted(res["options"].items()))) if "options" in res else f"run {name}"
        groups.setdefault(key, []).append((name, res))
    return list(groups.values())


def metric(res: dict, key: str, convention: str, where: str):
    """One metric of a results.json in a convention. A file written before evaluate kept both holds one, named by
    its "metrics_compat" (default when absent); asking it for the other is refused."""
    if "metrics" not in res:
        if res.get("metrics_compat", "default") != convention and key != "c_score":
            raise ValueError(f"{where}/results.json holds the {res.get('metrics_compat', 'default')} metric "
                             f"convention only (written before evaluate kept both): delete it and run `pal.py "
                             f"evaluate --run-dir {where}` again")
        return res.get(key)
    return (res["metrics"].get(convention) or {}).get(key)


def paper_numbers(path: Path = Path(__file__).parent / "docs" / "paper_tables.csv") -> dict:
    """The paper's numbers as printed, {(table, persona, paper model, variant): {metric key: value}}, from
    docs/paper_tables.csv (comma-separated, '#' starts a comment line; transcribed from the paper, checked in
    tests/test_pal_tables.py)."""
    lines = [ln.split(",") for ln in path.read_text(encoding="utf-8").splitlines() if ln and ln[0] != "#"]
    return {tuple(r[:4]): {k: float(v) for k, v in zip(lines[0][4:], r[4:])} for r in lines[1:]}


def layout_block(title: str, groups: list[str], rows: list[tuple], convention: str, paper: dict | None) -> str:
    """One of the paper's tables: rows (model, row name, [seed group per column group or None], [the paper's
    numbers per column group or None]); a cell is a mean (± std over seeds), `*` where a row's mean beats the
    second best of its model and column group with p < 0.05 (t_test; both with two runs or more). With `paper`,
    each row with the paper's numbers is followed by them and by the difference ours - paper."""
    keys = [k for _, k in PAPER_COLUMNS]
    values = [[[None if g is None else [metric(r, k, convention, n) for n, r in g] for k in keys] for g in gs]
              for _, _, gs, _ in rows]  # values[row][group][metric]: one value per seed, or None
    stars = set()
    for model in dict.fromkeys(m for m, *_ in rows):
        for gi in range(len(groups)):
            for ki in range(len(keys)):
                ranked = sorted((mean_std(v)[0], ri, v) for ri, (m, *_) in enumerate(rows)
                                if m == model and (v := values[ri][gi][ki]) and None not in v)[::-1]
                if len(ranked) > 1 and len(ranked[0][2]) > 1 and len(ranked[1][2]) > 1 and \
                        t_test(ranked[0][2], ranked[1][2]) < 0.05:
                    stars.add((ranked[0][1], gi, ki))

    def fmt(x, k):
        return format(x, ".3f" if k == "c_score" else ".2f")

    def cell(v, k, star):
        if v is None:
            return "·"  # no run
        if None in v:
            return "n/a"
        m, sd = mean_std(v)
        return fmt(m, k) + (f" ± {fmt(sd, k)}" if sd is not None else "") + ("*" if star else "")

    head = [f"{g} {c}" if i == 0 and g else c for g in groups for i, (c, _) in enumerate(PAPER_COLUMNS)]
    lines = [title, "", "| Model | Row | " + " | ".join(head) + " | Runs |",
             "|---|---|" + "---:|" * len(head) + "---|"]
    for ri, (model, name, gs, ref) in enumerate(rows):
        cells = [cell(values[ri][gi][ki], k, (ri, gi, ki) in stars) for gi in range(len(groups))
                 for ki, k in enumerate(keys)]
        runs = " / ".join(", ".join(n for n, _ in g) if g else "·" for g in gs)
        lines.append(f"| {model} | {name} | " + " | ".join(cells) + f" | {runs} |")
        if paper is not None and any(ref):
            ours = [mean_std(v)[0] if v and None not in v else None for gv in values[ri] for v in gv]
            theirs = [p.get(k) if p else None for p in ref for k in keys]
            diff = [fmt(o - t, k) if o is not None and t is not None else "" for o, t, k in
                    zip(ours, theirs, keys * len(groups))]
            lines.append("| | paper | " + " | ".join(fmt(t, k) if t is not None else "" for t, k in
                                                     zip(theirs, keys * len(groups))) + " | |")
            lines.append("| | ours − paper | " + " | ".join(d if d.startswith("-") or not d else "+" + d
                                                            for d in diff) + " | |")
    return "\n".join(lines)


def paper_tables(named: list[tuple[str, dict]], convention: str = "default", paper: dict | None = None,
                 as_model: str | None = None) -> str:
    """The runs as the paper lays them out, each table titled with its metric convention: Table 2 (rows per model:
    base, +Few-Shot, +FineTuning, +Prompting, PAL; original and revised personas as two column groups), Table 3 (the
    same on Chinese data), Table 5 (PAL and its ablations; the models as column groups), Figure 3 (PAL, Random, Not
    Select); then runs outside those layouts and every run's diagnostics. Runs that differ only by seed share a
    row. paper: the paper's numbers (paper_numbers) beside each row; as_model: the paper's model to compare every
    run with (a model the paper did not run)."""
    info = []
    for g in seed_groups(named):
        res = g[0][1]
        variant, name = res.get("variant", "pal"), row_name(res)
        dataset = res.get("dataset") or data_name(res.get("lang", "en"))
        model = paper_model(res.get("model")) or Path(str(res.get("model"))).name
        info.append(dict(group=g, variant=variant if name == ROW_NAMES.get(variant) else None, name=name,
                         dataset=dataset, personas=res.get("personas") or "original", model=model,
                         ref_model=as_model or paper_model(res.get("model"))))

    def block(title, members, row_order, row_model, group_of, group_names, ref_key):
        """One layout: a row per (row_model(member), variant) in row_order, a column group per name in group_names
        (group_of(member)); ref_key(member, variant): where the paper's number for that cell is (or None)."""
        conv = convention
        if convention == "authors" and any(m["dataset"] == "Baidu-Persona-Chat" for m in members):
            conv = "default"  # the authors segment Chinese with jieba, which this project does not reproduce
            title += " (the authors' convention needs jieba word segmentation: the default convention is shown)"
        seen: dict = {}  # a second run of one cell (other options, not another seed) makes a row "#2" of its own
        for m in members:
            cell = (row_model(m), m["variant"] or m["name"], group_of(m))
            m["key"], seen[cell] = cell[:2] + (seen.get(cell, 0),), seen.get(cell, 0) + 1
        keys = list(dict.fromkeys(m["key"] for m in members))
        order = list(dict.fromkeys(row_model(m) for m in members))
        keys.sort(key=lambda k: (order.index(k[0]), row_order.index(k[1]) if k[1] in row_order else len(row_order),
                                 k[2]))
        rows = []
        for model, row, k in keys:
            mine = [next((m for m in members if m["key"] == (model, row, k) and group_of(m) == g), None)
                    for g in group_names]
            ref = [paper.get(ref_key(m, row)) if paper is not None and m and m["ref_model"] else None for m in mine]
            rows.append((model, ROW_NAMES.get(row, row) + (f" #{k + 1}" if k else ""), [m and m["group"] for m in mine],
                         ref))
        return layout_block(f"{title}; metrics: {CONVENTIONS[conv]}", group_names, rows, conv, paper)

    out = []
    if as_model and paper is not None:
        out.append(f"Every run is compared with the paper's {as_model} rows: another model, not the paper's run.\n")
    for dataset, table in (("PERSONA-CHAT", "2"), ("Baidu-Persona-Chat", "3")):
        main = [m for m in info if m["dataset"] == dataset and m["variant"] in TABLE2_ROWS]
        if main:
            personas = [p for p in ("original", "revised") if any(m["personas"] == p for m in main)]
            out += [block(f"Table {table} ({dataset}; column groups: persona version)", main, TABLE2_ROWS,
                          lambda m: m["model"], lambda m: m["personas"], personas,
                          lambda m, row, t=table: (t, m["personas"] if t == "2" else "original", m["ref_model"], row)),
                    ""]
    for rows, title, table in ((TABLE5_ROWS, "Table 5 (ablations", "5"), (FIGURE3_ROWS, "Figure 3 (strategies", "")):
        for dataset, persona in dict.fromkeys((m["dataset"], m["personas"]) for m in info):
            members = [m for m in info if (m["dataset"], m["personas"]) == (dataset, persona) and m["variant"] in rows]
            if any(m["variant"] != "pal" for m in members):  # PAL alone is Table 2's row
                models = list(dict.fromkeys(m["model"] for m in members))
                paper_cell = table == "5" and (dataset, persona) == ("PERSONA-CHAT", "original")
                out += [block(f"{title}: {dataset}, {persona} personas; column groups: model)", members, rows,
                              lambda m: "", lambda m: m["model"], models,
                              lambda m, row: ("5", "original", m["ref_model"], row) if paper_cell else None), ""]
    rest = [m for m in info if m["variant"] not in TABLE2_ROWS + TABLE5_ROWS + FIGURE3_ROWS]
    if rest:
        out += [block("Runs outside the paper's tables (column groups: persona version)", rest, (),
                      lambda m: m["model"], lambda m: m["personas"], list(dict.fromkeys(m["personas"] for m in rest)),
                      lambda m, row: None), ""]
    return "\n".join(out + [diagnostics_table([nr for m in info for nr in m["group"]])])


def stage_table(run_dirs: list[str], examples: int = 0, paper: bool = False, metrics: str | None = None,
                paper_model_name: str | None = None):
    """The runs' results in the paper's layout (paper_tables), in the metric convention `metrics` (default: the
    paper's, "authors", with --paper, else "default"); with paper=True the paper's numbers beside each row; with
    examples=N also the first N replies of each run (same Test rows)."""
    named = []
    for d in run_dirs:
        p = Path(d) / "results.json"
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: run `python pal.py evaluate --run-dir {d}` first")
        named.append((str(Path(d)), read_json(p)))
    known = set(PAPER_MODELS.values())
    if paper_model_name is not None and paper_model_name not in known:
        raise ValueError(f"--paper-model {paper_model_name!r}: choose from {', '.join(sorted(known))}")
    convention = metrics or ("authors" if paper else "default")
    print(paper_tables(named, convention, paper_numbers() if paper else None, paper_model_name))
    if examples:
        rows = {Path(d).name: read_jsonl(Path(d) / "generations.jsonl")[:examples] for d in run_dirs}
        for k, first in enumerate(next(iter(rows.values()))):
            print(f"\nExample {k + 1}. Partner: {first['history'][-1] if first['history'] else '(opens)'}")
            print(f"  gold ({first['gold_persona'] or 'no persona'}): {first['gold']}")
            for name, rs in rows.items():
                if k < len(rs):
                    picked = f" [{rs[k]['selected_persona'] or 'no persona'}]" if rs[k]["selection_output"] else ""
                    print(f"  {name}{picked}: {rs[k]['response']}")


# ----------------------------------------------------------------------------------------------------------
# 5. Evaluation metrics
# ----------------------------------------------------------------------------------------------------------

# Every function takes `f(hypotheses, references)` in that order: hypothesis = generated, reference = gold (the
# paper authors' script swaps them for BLEU, turning precision into recall; we do not). A text is a string
# (tokenized by metric_tokens) or a list of tokens. Scores are fractions in [0, 1] (entropy: nats).

# A "word" is a run of letters/digits; every other visible character (punctuation, symbols, "_") is a token
# of its own, so "home-made!" -> ["home", "-", "made", "!"] and "don't" -> ["don", "'", "t"].
_WORD_OR_PUNCT = re.compile(r"[^\W_]+|[^\w\s]|_")


def metric_tokens(text: str, lang: str = "en") -> list[str]:
    """The tokens every metric in this module counts.

    English ("en"): lower-case, then split into words (runs of letters/digits) and single punctuation marks;
    whitespace only separates. "Hello, world!!" -> ["hello", ",", "world", "!", "!"].
    Chinese ("zh"): as English, but every CJK character (data.CJK_CHAR) is its own token (character-level
    BLEU/ROUGE, as Chinese dialogue papers report); Latin words and numbers inside Chinese text stay whole.
    """
    if not isinstance(text, str):
        raise TypeError(f"metric_tokens expects a str, got {type(text).__name__}: {text!r:.80}")
    text = text.lower()
    if lang == "zh":
        text = data.CJK_CHAR.sub(r" \g<0> ", text)  # isolate each ideograph, then split as English
    elif lang != "en":
        raise ValueError(f"metric_tokens: unknown lang {lang!r} (expected 'en' or 'zh')")
    return _WORD_OR_PUNCT.findall(text)


def _as_token_lists(texts, lang: str, what: str) -> list[list[str]]:
    """Strings are tokenized with metric_tokens; lists/tuples of strings are taken as tokens already."""
    if isinstance(texts, str):
        raise TypeError(f"{what}: expected a list of texts, got a single str {texts!r:.80}")
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            out.append(metric_tokens(t, lang))
        elif isinstance(t, (list, tuple)) and set(map(type, t)) <= {str}:  # (map/set run in C: fast)
            out.append(t if isinstance(t, list) else list(t))
        else:
            raise TypeError(f"{what}[{i}]: expected a str or a list of str tokens, got {t!r:.80}")
    return out


def _paired(hypotheses, references, lang: str) -> tuple[list[list[str]], list[list[str]]]:
    hyps = _as_token_lists(hypotheses, lang, "hypotheses")
    refs = _as_token_lists(references, lang, "references")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references: they must pair up one to one")
    return hyps, refs


# ---- BLEU ----

def _all_ngrams(tokens: list[str], max_n: int) -> list:
    """Every n-gram of `tokens` for n = 1..max_n in one list: unigrams are the tokens themselves (str), longer
    n-grams are tuples, so n-grams of different orders never compare equal. Order of g: 1 if str else len(g)."""
    shifted = [tokens[i:] for i in range(max_n)]
    out = list(tokens)
    for n in range(2, max_n + 1):
        out += zip(*shifted[:n])  # (t[i], t[i+1], ..., t[i+n-1]) for every start i
    return out


def bleu_statistics(hyps: list[list[str]], refs: list[list[str]], max_n: int = 4, compat: str = "nltk"):
    """Corpus sufficient statistics of BLEU: (matches[max_n], totals[max_n], hyp_len, ref_len).

    matches[k]: clipped (k+1)-gram matches, sum over pairs and hypothesis (k+1)-grams g of min(#hyp g, #ref g).
    totals[k]: hypothesis (k+1)-grams; a hypothesis shorter than k+1 tokens counts 1 in nltk (its per-sentence
    max(1, count)) and 0 in sacrebleu: `compat` picks which we reproduce. Lengths are summed over the corpus.
    """
    if compat not in ("nltk", "sacrebleu"):
        raise ValueError(f"compat must be 'nltk' or 'sacrebleu', got {compat!r}")
    floor = 1 if compat == "nltk" else 0
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs):
        hyp_len += len(h)
        ref_len += len(r)
        for k in range(max_n):
            count = len(h) - k  # number of (k+1)-grams in the hypothesis
            totals[k] += count if count > 0 else floor
        # only n-grams on both sides can match: a set intersection finds them, list.count clips (both in C)
        hyp_grams, ref_grams = _all_ngrams(h, max_n), _all_ngrams(r, max_n)
        for g in set(hyp_grams).intersection(ref_grams):
            order = 1 if type(g) is str else len(g)
            matches[order - 1] += min(hyp_grams.count(g), ref_grams.count(g))
    return matches, totals, hyp_len, ref_len


def corpus_bleu(hypotheses, references, max_n: int = 4, lang: str = "en", compat: str = "nltk") -> list[float]:
    """Corpus-level BLEU-1..max_n (Papineni et al. 2002), one reference per hypothesis, as fractions in [0, 1].

    BLEU-n is cumulative: the geometric mean of the micro-averaged modified precisions p_1..p_n times one
    brevity penalty BP = 1 if c > r else exp(1 - r / c) (c, r: total hypothesis / reference length; 0 if c = 0).
    No smoothing: equal to nltk's corpus_bleu(weights=(1/n,)*n) and, with compat="sacrebleu", to sacrebleu's
    BLEU(tokenize="none", smooth_method="none") / 100 on the same tokens. An order without any match makes
    BLEU-n exactly 0 (sacrebleu too; nltk warns and returns ~1e-77 instead).
    """
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    hyps, refs = _paired(hypotheses, references, lang)
    matches, totals, c, r = bleu_statistics(hyps, refs, max_n, compat)
    if c == 0:
        return [0.0] * max_n  # nothing generated: BP = 0
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    scores, log_sum = [], 0.0
    for k in range(max_n):
        if matches[k] == 0 or totals[k] == 0:
            scores.extend([0.0] * (max_n - k))  # p_k = 0 zeroes this order and every higher one
            break
        log_sum += math.log(matches[k] / totals[k])
        scores.append(bp * math.exp(log_sum / (k + 1)))
    return scores


# ---- ROUGE-L ----

def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists, bit-parallel (Allison-Dix / Hyyro).

    Bit i of `v` stands for position i of `a`; one big-int step per token of `b` updates all len(a) DP cells
    at once. After the last step, LCS = the number of zero bits of v.
    """
    if not a or not b:
        return 0
    match = {}  # token -> bitmask of the positions in `a` where it occurs
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = match.get(tok)
        if m is None:
            continue  # u = 0 leaves v unchanged
        u = v & m
        v = ((v + u) | (v - u)) & full  # the carry of v + u moves each matched bit to the next free slot
    return len(a) - v.bit_count()


def rouge_l_scores(hypotheses, references, beta: float = 1.0, lang: str = "en") -> list[float]:
    """Sentence-level ROUGE-L F_beta of each (hypothesis, reference) pair (Lin 2004): P = LCS / len(hyp),
    R = LCS / len(ref), F = (1 + beta^2) P R / (R + beta^2 P), 0 when LCS = 0. beta = 1 is rouge-score's
    rougeL fmeasure (no stemming); beta = 1.2 is pycocoevalcap's variant."""
    hyps, refs = _paired(hypotheses, references, lang)
    b2 = beta * beta
    out = []
    for h, r in zip(hyps, refs):
        # bits over the longer side: fewer steps, and lcs_length is symmetric
        lcs = lcs_length(h, r) if len(h) >= len(r) else lcs_length(r, h)
        if lcs == 0:
            out.append(0.0)
            continue
        p, rec = lcs / len(h), lcs / len(r)
        if beta == 1.0:
            out.append(2 * p * rec / (p + rec))  # the exact expression rouge-score evaluates
        else:
            out.append((1 + b2) * p * rec / (rec + b2 * p))
    return out


def rouge_l(hypotheses, references, beta: float = 1.0, lang: str = "en") -> float:
    """ROUGE-L F_beta averaged over pairs (F1 by default; beta=1.2 for pycocoevalcap's variant)."""
    scores = rouge_l_scores(hypotheses, references, beta, lang)
    return math.fsum(scores) / len(scores) if scores else 0.0


# ---- Diversity: n-gram entropy and Distinct-n ----

def _corpus_ngram_counts(hypotheses, n: int, lang: str) -> Counter:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts = Counter()
    for toks in _as_token_lists(hypotheses, lang, "hypotheses"):
        counts.update(zip(*(toks[i:] for i in range(n))))  # every contiguous n-gram, as a tuple
    return counts


def ngram_entropy(hypotheses, n: int, lang: str = "en", base: float = math.e) -> float:
    """Entropy of the n-gram distribution pooled over all responses (Zhang et al. 2018's "Ent-n"):
    p(g) = count(g) / total, H = -sum_g p(g) log p(g), in nats (base=2: bits); 0.0 without n-grams."""
    counts = _corpus_ngram_counts(hypotheses, n, lang)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    # H = log T - (1/T) sum_g c_g log c_g : one log per distinct n-gram
    h = math.log(total) - math.fsum(c * math.log(c) for c in counts.values()) / total
    return h / math.log(base)


def distinct_n(hypotheses, n: int, lang: str = "en") -> float:
    """Distinct-n (Li et al. 2016), corpus level: distinct n-grams / all n-grams, pooled over every
    hypothesis. No n-grams at all -> 0.0."""
    counts = _corpus_ngram_counts(hypotheses, n, lang)
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


# ---- Lexical persona coverage (no model needed; NOT the NLI-based C.score) ----

def persona_coverage(responses, personas_per_response, lang: str = "en") -> float:
    """Lexical persona coverage: how much of its persona a response mentions, measured by word overlap.

    For response r with persona sentences p_1..p_m, let W(x) = data.content_words(x), the content words the
    persona labels are made from (stop words removed, light stemming; for Chinese, characters and bigrams of
    non-stop characters). Then
        cov(r) = max_j |W(r) & W(p_j)| / |W(p_j)|       (persona sentences with empty W are skipped)
    i.e. the fraction of the best-covered persona sentence's content words that the response uses; 0 if no
    persona sentence has content words. The score is the mean of cov(r) over responses, in [0, 1].

    This is a *different metric* from C.score (nli.c_score): it needs no model and cannot tell entailment
    from contradiction ("i love dogs" and "i hate dogs" cover "i have dogs" equally). Report it under its own
    name; never as C.score. (`lang` is accepted for a uniform signature: content_words handles both.)
    """
    if len(responses) != len(personas_per_response):
        raise ValueError(f"{len(responses)} responses but {len(personas_per_response)} persona lists")
    total = 0.0
    for i, (resp, personas) in enumerate(zip(responses, personas_per_response)):
        if isinstance(personas, str):
            raise TypeError(f"personas_per_response[{i}] must be a list of persona sentences, got a str")
        r_words = data.content_words(resp)
        covered = [len(r_words & w) / len(w) for w in map(data.content_words, personas) if w]
        total += max(covered, default=0.0)
    return total / len(responses) if len(responses) else 0.0


# ---- The paper authors' evaluation, to hold a run against the published numbers (results.json metrics.authors) -
# Their decode.py scores with pycocoevalcap, passing the gold response where the hypothesis goes and the reply
# as the reference (BLEU and ROUGE-L), on whitespace tokens with case kept, ROUGE-L with beta 1.2; Distinct-n
# divides distinct n-grams by all *tokens*. Reproduced here as they ran it; the default metrics above do not.

def coco_bleu(hyps: list[list[str]], refs: list[list[str]], max_n: int = 4) -> list[float]:
    """BLEU-1..max_n as pycocoevalcap's BleuScorer computes it (one reference each): the corpus statistics of
    bleu_statistics, precisions smoothed as (matches + 1e-15) / (totals + 1e-9), and the brevity penalty from
    the same smoothed length ratio."""
    matches, totals, c, r = bleu_statistics(hyps, refs, max_n, "sacrebleu")  # no floor for short hypotheses
    ratio = (c + 1e-15) / (r + 1e-9)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    out, product = [], 1.0
    for k in range(max_n):
        product *= (matches[k] + 1e-15) / (totals[k] + 1e-9)
        out.append(bp * product ** (1 / (k + 1)))
    return out


def _authors_spaced(text: str) -> str:
    """Their Distinct / Entropy preprocessing: every ASCII punctuation mark spaced out, runs of spaces joined."""
    for mark in string.punctuation:
        text = text.replace(mark, f" {mark} ")
    return re.sub(" +", " ", text).strip()


def authors_metrics(replies: list[str], golds: list[str]) -> dict:
    """BLEU-1/2/4, ROUGE-L, Distinct-1/2 and entropy-1..4 of the replies, computed as the authors' decode.py
    computes them (x100 like score_generations). English only: for Chinese they segment words with jieba."""
    bleu = coco_bleu([g.split() for g in golds], [h.split() for h in replies])  # gold in the hypothesis' place
    rouge = rouge_l_scores([g.split(" ") for g in golds], [h.split(" ") for h in replies], beta=1.2)
    spaced = [_authors_spaced(h) for h in replies]
    distinct_tokens = [t.split(" ") for t in spaced]
    n_tokens = max(sum(map(len, distinct_tokens)), 1)
    res = {"bleu1": 100 * bleu[0], "bleu2": 100 * bleu[1], "bleu4": 100 * bleu[3],
           "rouge_l": 100 * math.fsum(rouge) / max(len(rouge), 1)}
    for n in (1, 2):
        res[f"distinct{n}"] = len(_corpus_ngram_counts(distinct_tokens, n, "en")) / n_tokens
    for n in (1, 2, 3, 4):
        res[f"entropy{n}"] = ngram_entropy([t.split() for t in spaced], n)
    res["entropy"] = res["entropy4"]
    return res


# ---- Diagnostics: is the persona used, or parroted? (issue 14) ----
# Each is computed on the model's replies and on the gold responses of the same rows, the yardstick.

def is_verbatim_copy(response: str, persona: str, min_words: int = 2) -> bool:
    """True if every content word of `persona` (data.content_word_sequence) reappears in `response` in the same
    order, gaps allowed. Persona sentences with fewer than `min_words` content words never count: sharing the
    single word of "i have a dog" is using a topic, not copying a sentence."""
    wanted = data.content_word_sequence(persona)
    if len(wanted) < min_words:
        return False
    said = iter(data.content_word_sequence(response))
    return all(w in said for w in wanted)  # `in` consumes the iterator up to the match: a subsequence test


def verbatim_copy_rate(responses, personas_per_response) -> float:
    """Share of responses that copy (is_verbatim_copy) at least one of their persona sentences."""
    if len(responses) != len(personas_per_response):
        raise ValueError(f"{len(responses)} responses but {len(personas_per_response)} persona lists")
    hits = sum(any(is_verbatim_copy(r, p) for p in ps) for r, ps in zip(responses, personas_per_response))
    return hits / len(responses) if responses else 0.0


def mean_words(responses, lang: str = "en") -> float:
    """Mean words per response: metric tokens with a letter or digit (punctuation is not a word; a CJK
    character is one word)."""
    token_lists = _as_token_lists(responses, lang, "responses")
    counts = [sum(1 for t in toks if any(c.isalnum() for c in t)) for toks in token_lists]
    return sum(counts) / len(counts) if counts else 0.0


def selection_diagnostics(picks: list[str | None], labels: list[str | None], dialogue_ids: list) -> dict:
    """How the selection step behaves, from one persona pick per row (None = "no persona applies") in test
    order, with the rows' gold persona labels (None = unlabelled):
      same_persona   share of consecutive turns of one dialogue whose picks are the same persona sentence
      no_persona     share of rows picking no persona (compare: the unlabelled share of the labels)
      select_acc     among rows with a label, the share whose pick is the labelled sentence
    Called with picks = labels it gives the gold yardstick (select_acc is then 1 by definition)."""
    pairs = [(a, b) for a, b, da, db in zip(picks, picks[1:], dialogue_ids, dialogue_ids[1:]) if da == db]
    labelled = [(p, g) for p, g in zip(picks, labels) if g is not None]
    return {"same_persona": sum(a is not None and a == b for a, b in pairs) / len(pairs) if pairs else None,
            "no_persona": sum(p is None for p in picks) / len(picks) if picks else None,
            "select_acc": sum(p == g for p, g in labelled) / len(labelled) if labelled else None}


def diagnostics(rows: list[dict], lang: str = "en") -> dict:
    """The diagnostics of generation rows (response, gold, personas, selected_persona, gold_persona,
    dialogue_id), for the replies and, under "gold", for the gold responses. Rates are fractions. The
    selection entries are None for a run without a selection step (strategy none)."""
    def of(texts):
        return {"copy_rate": verbatim_copy_rate(texts, personas), "words": mean_words(texts, lang),
                "distinct1": distinct_n(texts, 1, lang), "distinct2": distinct_n(texts, 2, lang)}

    personas, ids = [r["personas"] for r in rows], [r.get("dialogue_id") for r in rows]
    labels = [r.get("gold_persona") for r in rows]
    picks = [r.get("selected_persona") for r in rows]
    selected = any(r.get("selection_output") is not None or r.get("selected_persona") is not None for r in rows)
    none = dict.fromkeys(("same_persona", "no_persona", "select_acc"))
    out = {**of([r["response"] for r in rows]), **(selection_diagnostics(picks, labels, ids) if selected else none)}
    golds = [r["gold"] for r in rows]
    gold = {**of(golds), **selection_diagnostics(labels, labels, ids),
            "persona_coverage": 100 * persona_coverage(golds, personas, lang)}  # x100 as in score_generations
    return {**out, "gold": gold}


# ----------------------------------------------------------------------------------------------------------
# 6. Command line
# ----------------------------------------------------------------------------------------------------------

STAGES = {"sft": stage_sft, "pairs": stage_pairs, "dpo": stage_dpo, "predict": stage_predict,
          "evaluate": stage_evaluate}
OUTPUTS = {"sft": "sft/final", "pairs": "pairs.jsonl", "dpo": "dpo/final", "predict": "generations.jsonl",
           "evaluate": "results.json"}  # a stage whose output exists is complete: it is skipped

# Which options shape each stage's output, besides those of the stage whose output it reads (stage_input).
# A stage records them when it starts (RUN_DIR/stages.json, infra/rundir.py); a later call that changes one of them
# for a stage that has started or finished is refused, so one run never mixes two settings. Options that change
# nothing but speed or bookkeeping (gen_batch, log_every, save_every, save_minutes, logps) are not listed.
DATA_OPTIONS = ("model", "data_dir", "personas", "history_turns", "lang", "limit", "labels", "seed", "max_len")
TRAIN_OPTIONS = ("dtype", "precision", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_init",
                 "lora_plus_ratio", "grad_clip", "batch_size", "grad_accum")
STAGE_OPTIONS = {
    "sft": DATA_OPTIONS + TRAIN_OPTIONS + ("tasks", "fmt", "select_ratio", "select_none_ratio", "sft_lr",
                                           "sft_epochs", "sft_warmup", "sft_reduction", "sft_keep", "eval_limit",
                                           "tune", "prompt_tokens", "prompt_lr", "select_target"),
    "pairs": ("gen_dtype", "max_new_tokens"),
    "dpo": TRAIN_OPTIONS + ("dpo_lora_r", "dpo_adapters", "dpo_grad_accum", "align", "strategy", "dpo_lr",
                            "dpo_beta", "dpo_steps", "dpo_epochs", "dpo_warmup", "eval_every", "patience",
                            "eval_limit", "nli", "gen_dtype", "max_new_tokens", "select_max_new_tokens", "shots",
                            "select_target"),
    "predict": ("from_run", "strategy", "shots", "gen_dtype", "max_new_tokens", "select_max_new_tokens",
                "select_target"),
    "evaluate": ("nli",),
}
# Checked while a stage runs, free to differ once it is done: DPO's validation scorer; the global batch (sequences
# per optimizer step over every rank: a resume by another number of processes would change the schedule).
RESUME_ONLY = {"sft": ("global batch (sft)",), "dpo": ("nli", "global batch (dpo)")}
# What a record without an option meant (inputs it did not note then are not checked)
ADDED_LATER = {"tune": "weights", "shots": 0, "lora_init": "kaiming", "lora_plus_ratio": 1.0, "grad_clip": 1.0,
               "dpo_adapters": "fresh", "select_target": "number", "global batch (sft)": rundir.UNRECORDED,
               "global batch (dpo)": rundir.UNRECORDED, "weights digest": rundir.UNRECORDED,
               "nli (labels)": rundir.UNRECORDED}
# options that no longer exist, dropped from older run.json files and stage records: evaluate writes both metric
# conventions now (--metrics-compat chose one)
RETIRED = ("metrics_compat",)


CHAT_DECODING = ("strategy", "shots", "gen_dtype", "max_new_tokens", "select_max_new_tokens")  # chat: free
STAGE_PATHS = {"sft": "sft", "pairs": "pairs.jsonl*", "dpo": "dpo", "predict": "generations.jsonl*",
               "evaluate": "results.*"}  # each stage's outputs, finished or not (glob patterns in RUN_DIR)


def stage_input(cfg: RunConfig, stage: str) -> str | None:
    """The stage whose output `stage` reads (None: the base model and the data only)."""
    align = cfg.switches()["align"]
    trained = "sft" if align == "none" else "dpo"
    return {"sft": None, "pairs": "sft", "dpo": "pairs" if align == "dpo" else "sft",
            "predict": None if cfg.from_run else trained, "evaluate": "predict"}[stage]


def stage_options(cfg: RunConfig, stage: str) -> dict:
    """The options `stage`'s output depends on, through the stages before it: {name: value}. Switches are
    resolved from the variant; a local model or data directory is compared by its real path."""
    value = {**dataclasses.asdict(cfg), **cfg.switches()}
    for k in ("model", "data_dir"):
        if value[k] and Path(value[k]).exists():
            value[k] = os.path.realpath(value[k])
    upstream = stage_input(cfg, stage)
    inherited = stage_options(cfg, upstream) if upstream else {k: value[k] for k in DATA_OPTIONS}
    if upstream == "dpo":  # DPO's validation scorer is not handed on: predict and evaluate may use another
        inherited.pop("nli", None)
    own = STAGE_OPTIONS[stage] if stage != "sft" or cfg.switches()["tasks"] != "none" else DATA_OPTIONS
    if value["tune"] != "prompt":  # the soft prompt's settings shape nothing else
        own = [k for k in own if k not in ("prompt_tokens", "prompt_lr")]
    if not (value["lora_r"] and value["tasks"] != "none" and value["tune"] == "weights"):  # no SFT adapters
        own = [k for k in own if k != "dpo_adapters"]
    inherited = {k: v for k, v in inherited.items() if not k.startswith("global batch")}  # the trainer's own
    trains = {"global batch (sft)": global_batch(cfg, "sft")} if stage == "sft" and "sft_lr" in own else {}
    if stage == "dpo":
        trains = {"global batch (dpo)": global_batch(cfg, "dpo")}
    return {**inherited, **{k: value[k] for k in own}, **trains}


def input_files(cfg: RunConfig) -> list[Path]:
    """The files a run reads besides its own: the data files and the model's config.json (their digests are
    recorded with each stage's options)."""
    variant = data.PERSONA_VARIANTS[cfg.personas] if cfg.personas else "original"
    files = list(data.split_files(cfg.data_dir, variant)[1].values()) if cfg.data_dir else []
    local_model = Path(cfg.model or "") / "config.json"
    return files + ([local_model] if cfg.model and local_model.is_file() else [])


def input_digests(cfg: RunConfig) -> dict:
    """The weights a run reads, by digest (infra/hub.py caches it beside them): the base model's when it is a local
    directory, and the NLI labeller (path and weights) when --labels nli, whose labels shape SFT, pairs and DPO."""
    local = cfg.model and Path(cfg.model).is_dir()
    labeller = None
    if cfg.labels == "nli" and cfg.nli:
        where = resolve_model_dir(cfg.nli)
        labeller = {"nli": os.path.realpath(cfg.nli) if Path(cfg.nli).exists() else cfg.nli,
                    "weights": weights_digest(where)}
    return {"weights digest": weights_digest(cfg.model) if local else None, "nli (labels)": labeller}


def stage_runs(cfg: RunConfig, stage: str) -> bool:
    """False for a stage the variant does without (no SFT: zero-shot; no pairs or DPO without DPO alignment)."""
    sw = cfg.switches()
    if cfg.from_run:  # inference only: another run trained the model
        return stage in ("predict", "evaluate")
    return {"sft": sw["tasks"] != "none", "pairs": sw["align"] == "dpo", "dpo": sw["align"] != "none"}.get(stage, True)


def stage_list(command: str, cfg: RunConfig) -> list[str]:
    """The stages a command runs: one, or all five; those the variant does without are left out (and said so)."""
    stages = list(STAGES) if command == "all" else [command]
    for s in stages:
        if not stage_runs(cfg, s):
            say(f"{s}: not part of variant {cfg.variant} ({', '.join(f'{k}={v}' for k, v in cfg.switches().items())})")
    return [s for s in stages if stage_runs(cfg, s)]


def run_stages(args) -> None:
    """One command: check the options and the run directory, then run the stages asked for, in order. Under
    torchrun every rank trains, rank 0 alone checks, records, generates and scores, and the others wait for it
    at a barrier before each stage (DPO reads the pairs rank 0 wrote)."""
    run = Path(args.run_dir)
    if args.stage in ("evaluate", "chat") and not (run / "run.json").exists():
        raise FileNotFoundError(f"{run / 'run.json'} does not exist: no run there (check --run-dir)")
    cfg = load_run_config(run, {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)})
    start_ranks()  # under torchrun: the process group (infra/dist.py)
    with rundir.RunLock(run) if is_rank0() else contextlib.nullcontext():
        records, digests = prepare_run(args, run, cfg) if is_rank0() else ({}, {})
        if args.stage == "chat":
            return stage_chat(cfg, run, args.persona)
        for s in stage_list(args.stage, cfg):
            barrier()  # every rank sees the same outputs: none is being written now
            if (run / OUTPUTS[s]).exists():
                say(f"{s}: {run / OUTPUTS[s]} exists, skipping")
                continue
            if is_rank0():
                rundir.record_stage(run, records, s, {**stage_options(cfg, s), **digests})
            t0 = time.time()
            if s != "evaluate" or is_rank0():  # training and generation use every rank
                STAGES[s](cfg, run)
            say(f"{s}: done in {time.time() - t0:.0f} s")
        barrier()
    stop_ranks()  # every rank is done: leave the process group (infra/dist.py)


def prepare_run(args, run: Path, cfg: RunConfig) -> tuple[dict, dict]:
    """Rank 0's checks before any stage: the model fits the options, no started stage changes its settings
    (or --redo); then run.json is saved. -> (stage records, file digests)."""
    if cfg.model is None:
        raise ValueError("no model: give --model (a Hugging Face-layout directory or a hub id)")
    if args.stage != "evaluate":
        check_model_fits(cfg)
    if cfg.from_run:
        final_weights(cfg, run)  # another run's model, checked before anything is recorded
    rundir.check_untracked(run, list(STAGE_PATHS.values()), args.trust_outputs)
    records = rundir.read_records(run)
    if cfg.lang is None and cfg.data_dir and not records:  # decided once, kept in run.json and the records
        cfg.lang = decide_lang(data.load_splits(cfg.data_dir, limit=cfg.limit, personas=cfg.personas)[0])
    digests = {**rundir.file_digests(input_files(cfg)), **input_digests(cfg)}
    checked = cfg  # chat writes nothing: it may decode otherwise than the run did
    if args.stage == "chat":
        saved = load_declared(RunConfig, run / "run.json", {})
        checked = dataclasses.replace(cfg, **{k: getattr(saved, k) for k in CHAT_DECODING})
    now = {s: {**stage_options(checked, s), **digests} for s in STAGES}
    finished = {s: (run / OUTPUTS[s]).exists() for s in STAGES}
    records = {s: {**r, "options": {k: v for k, v in r["options"].items() if k not in RETIRED}}
               for s, r in records.items()}
    records = rundir.check_records(run, records, now, finished, STAGE_PATHS,
                                   args.redo and args.stage != "chat", RESUME_ONLY, ADDED_LATER, say)
    if args.stage != "chat":
        write_json(run / "run.json", dataclasses.asdict(cfg))
    return records, digests


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pal.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    helps = {name: fn.__doc__ for name, fn in STAGES.items()}
    helps.update(all="sft, pairs, dpo, predict and evaluate in order (each skipped when complete)",
                 chat=stage_chat.__doc__)
    for name, h in helps.items():
        p = sub.add_parser(name, help=h.split("\n")[0], description=h)
        p.add_argument("--run-dir", required=True, help="directory of this run (created; holds run.json)")
        p.add_argument("--redo", action="store_true", help="a stage was built with other options: move its outputs "
                       "and the later stages' to RUN_DIR/superseded/ and start them again (default: refuse)")
        p.add_argument("--trust-outputs", action="store_true", help="a run directory with outputs but no "
                       "stages.json: take them as built with these options (default: refuse)")
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        add_flags(p, RunConfig, aliases={"from_run": "--from"})  # the paper's "--from RUN_DIR"
        if name == "chat":
            p.add_argument("--persona", action="append", help="a persona sentence (repeat the flag)")
    table = sub.add_parser("table", help="several runs' results.json side by side (Markdown)")
    table.add_argument("run_dirs", nargs="+")
    table.add_argument("--examples", type=int, default=0, help="also show each run's first N replies")
    table.add_argument("--paper", action="store_true", help="the paper's number for the same model, data, persona "
                       "version and row beside each row, and the difference (docs/paper_tables.csv)")
    table.add_argument("--metrics", choices=tuple(CONVENTIONS), help="metric convention (default: authors with "
                       "--paper, the convention of the paper's tables; else default)")
    table.add_argument("--paper-model", help="with --paper: compare every run with this model of the paper (for "
                       "a model the paper did not run, e.g. a CPU run: say so when you show it)")
    table.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    try:
        if args.stage == "table":
            return stage_table(args.run_dirs, args.examples, args.paper, args.metrics, args.paper_model)
        return run_stages(args)
    except Exception as e:  # a bad option, file or checkpoint: one line that names it, and exit code 1
        if args.debug:
            raise
        sys.exit(f"pal.py {args.stage}: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"pal.py {args.stage}: interrupted; the same command resumes")


if __name__ == "__main__":
    main()
