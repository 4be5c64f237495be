#!/usr/bin/env bash
# The checks of the sharded engines and the offloaded teacher that need a GPU, in one run (< 8 minutes on
# one GPU, offline: it builds the tiny model and data from the repository). One verdict line per check:
#   PASS|FAIL|SKIP <check>: <figures>
# The verdicts are also written to <workdir>/verdicts.txt; each run's log is under <workdir>/logs/.
#   bash scripts/gpu_check.sh [workdir]
#   GPU_CHECK_PYTHON   interpreter (default: .venv/bin/python when present, else python3)
# Checks (each independent, each under its own time limit):
#   zero3          DeepSpeed ZeRO-3 at world size 1 vs the unsharded run: logged loss, sft_loss, llm_kd_loss,
#                  token_count per step and the adapter, relative 1e-5 (fp32, base-anchor GKD, fused loss)
#   fsdp2          FSDP2 full-shard at world size 1 vs the same unsharded run
#   zero3_full     full fine-tune (the LM head trains, separate frozen teacher): ZeRO-3 vs unsharded,
#                  losses and every trained weight
#   offload        separate teacher with and without rlhf.offload_teacher_model (bf16, the bench's large
#                  model): same losses; step time and peak reserved GPU memory of both
#   teacher_cache  separate live teacher vs training from its top-64 cache (custom.teacher_cache, bf16, the
#                  bench's large model): step time and peak reserved GPU memory of both, and the cache pass
#   kd_step        bench/kd_step.py --model-size large --dtype bf16 (sequence length 1800, one round): time
#                  and peak GPU memory ratios to stock SFT, against the bench's targets
set -u

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
  py="$GPU_CHECK_PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then
  py="$root/.venv/bin/python"
else
  py="$(command -v python3)"
fi
work="${1:-$(mktemp -d /tmp/anchorkd-gpu-check.XXXXXX)}"
mkdir -p "$work/logs" "$work/runs"
work="$(cd "$work" && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
demo_config="$root/configs/demo/stage_2_llm_lora_gkd.yaml"
started=$(date +%s)
: > "$work/verdicts.txt"

verdict() {  # STATUS CHECK FIGURES
  printf '%s %s: %s\n' "$1" "$2" "$3" | tee -a "$work/verdicts.txt"
}

# Exact comparisons need the same arithmetic on both sides: fp32 weights and no mixed precision (ms-swift
# turns fp16 on for float32 models when the config leaves it unset).
fp32=(training.fp16=false training.bf16=false)

train() {  # NAME LIMIT_S OVERRIDES...: one `NPROC_PER_NODE=1 anchorkd train` of the demo GKD config
  local name=$1 limit=$2
  shift 2
  rm -rf "$work/runs/$name"
  (cd "$work" && NPROC_PER_NODE=1 MASTER_PORT=$((20000 + RANDOM % 20000)) timeout "$limit" \
    "$py" -m anchorkd.cli train --config "$demo_config" \
    "training.output_dir=$work/runs/$name" training.add_version=false training.eval_strategy=no \
    training.logging_steps=1 training.report_to=[none] "$@") > "$work/logs/$name.log" 2>&1
  local status=$?
  if [ "$status" -ne 0 ]; then
    local why
    why=$(grep -m 1 -E 'anchorkd: error|Error:' "$work/logs/$name.log" | cut -c 1-240)
    echo "exit $status: ${why:-see the log} (log: $work/logs/$name.log)"
  fi
  return "$status"
}

compare() {  # CANDIDATE REFERENCE WEIGHTS_FILE [optional]: prints the figures; exit 0 when within tolerance
  "$py" - "$work/runs/$1" "$work/runs/$2" "$3" "${4:-required}" <<'EOF'
import sys
from pathlib import Path

from anchorkd.monitor.report import read_logging_jsonl

candidate, reference, weights_file, need = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
REL, KD_ABS = 1e-5, 5e-8  # a KD term near 0 carries ~1e-8 of fp32 rounding (docs/scaling_out.md)


def steps(run):
    return [r.metrics for r in read_logging_jsonl(run / "logging.jsonl") if r.split == "train" and "loss" in r.metrics]


got, want = steps(candidate), steps(reference)
ok = len(got) == len(want) > 0
worst = {}
for g, w in zip(got, want):
    for key in ("loss", "sft_loss", "llm_kd_loss", "token_count"):
        if key not in w:
            continue
        diff = abs(g.get(key, float("nan")) - w[key])
        rel = diff / max(abs(w[key]), 1e-30)
        ok &= diff <= (KD_ABS + REL * abs(w[key]) if key == "llm_kd_loss" else REL * abs(w[key]))
        worst[key] = max(worst.get(key, 0.0), diff if key == "llm_kd_loss" else rel)
figures = [f"{len(got)}/{len(want)} steps"]
figures += [f"{k} {'abs' if k == 'llm_kd_loss' else 'rel'} {v:.1e}" for k, v in worst.items()]


def last_weights(run):
    found = sorted(run.glob(f"checkpoint-*/{weights_file}"), key=lambda p: int(p.parent.name.split("-")[1]))
    return found[-1] if found else None


a, b = last_weights(candidate), last_weights(reference)
if a and b:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    common = [k for k in wb if k in wa]
    ok &= len(common) == len(wb) > 0
    rel = max(((wa[k].float() - wb[k].float()).norm() / wb[k].float().norm().clamp_min(1e-12)).item() for k in common)
    ok &= rel <= REL
    figures.append(f"{weights_file} {len(common)} tensors max rel {rel:.1e}")
else:
    ok &= need == "optional"
    figures.append(f"{weights_file} not compared (candidate {'found' if a else 'missing'}, reference {'found' if b else 'missing'})")
print("; ".join(figures))
sys.exit(0 if ok else 1)
EOF
}

# --- environment -------------------------------------------------------------------------------------
env_figures=$("$py" - <<'EOF' 2>&1
import importlib.util

import torch

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
ds = importlib.util.find_spec("deepspeed") is not None
print(f"torch {torch.__version__} cuda {torch.version.cuda} gpu {gpu} deepspeed {'yes' if ds else 'no'}")
raise SystemExit(0 if torch.cuda.is_available() else 1)
EOF
)
if [ $? -eq 0 ]; then verdict PASS environment "$env_figures"; else verdict FAIL environment "no CUDA device: $env_figures"; fi
has_deepspeed=$("$py" -c 'import importlib.util; print(int(importlib.util.find_spec("deepspeed") is not None))' 2>/dev/null || echo 0)

# --- set-up: tiny model and data, offline ------------------------------------------------------------
if out=$(cd "$work" && timeout 120 "$py" -m anchorkd.cli prepare-demo --quick --root outputs/demo 2>&1); then
  verdict PASS setup "demo assets in $work/outputs/demo"
else
  verdict FAIL setup "prepare-demo: $(echo "$out" | tail -n 1)"
fi

# --- ZeRO-3 and FSDP2 vs unsharded (LoRA, base-anchor teacher, fused loss) ------------------------------
lora=(training.max_steps=3 training.save_steps=3 training.per_device_train_batch_size=4 "${fp32[@]}")
if msg=$(train unsharded 120 "${lora[@]}"); then
  if [ "$has_deepspeed" = 1 ]; then
    if msg=$(train zero3 120 "${lora[@]}" training.deepspeed=zero3); then
      if figures=$(compare zero3 unsharded adapter_model.safetensors); then verdict PASS zero3 "$figures"
      else verdict FAIL zero3 "$figures"; fi
    else verdict FAIL zero3 "$msg"; fi
  else
    verdict SKIP zero3 "deepspeed not installed (pip install 'anchorkd[deepspeed]')"
  fi
  # FSDP2 saves sharded checkpoints: the adapter is compared when it is also written as safetensors.
  if msg=$(train fsdp2 120 "${lora[@]}" training.fsdp=fsdp2 training.save_only_model=false); then
    if figures=$(compare fsdp2 unsharded adapter_model.safetensors optional); then verdict PASS fsdp2 "$figures"
    else verdict FAIL fsdp2 "$figures"; fi
  else verdict FAIL fsdp2 "$msg"; fi
else
  verdict FAIL zero3 "unsharded reference failed: $msg"
  verdict FAIL fsdp2 "unsharded reference failed: $msg"
fi

# --- ZeRO-3 with a training LM head (full fine-tune, separate frozen teacher) ------------------------------
full=("${lora[@]}" tuner.tuner_type=full training.learning_rate=1e-4 rlhf.teacher_model_type=qwen3_vl)
if [ "$has_deepspeed" != 1 ]; then
  verdict SKIP zero3_full "deepspeed not installed"
elif ! msg=$(train full_unsharded 120 "${full[@]}"); then
  verdict FAIL zero3_full "unsharded reference failed: $msg"
elif ! msg=$(train full_zero3 120 "${full[@]}" training.deepspeed=zero3); then
  verdict FAIL zero3_full "$msg"
elif figures=$(compare full_zero3 full_unsharded model.safetensors); then
  verdict PASS zero3_full "$figures"
else
  verdict FAIL zero3_full "$figures"
fi

# --- offloaded separate teacher: cost ---------------------------------------------------------------------
large="$work/models/large"
if [ ! -d "$large" ]; then
  timeout 120 "$py" -c "
import sys
from pathlib import Path
sys.path.insert(0, '$root/bench')
from kd_step import build_model
build_model(Path('$large'), 'large')
" > "$work/logs/large_model.log" 2>&1
  ln -sfn "$large" "$work/models/large-teacher"  # another path: ms-swift loads a separate teacher copy
fi
teacher=(model.model="$large" model.torch_dtype=bfloat16 rlhf.teacher_model="$work/models/large-teacher"
  rlhf.teacher_model_type=qwen3_vl training.max_steps=6 training.save_steps=100 training.per_device_train_batch_size=4)
if [ ! -f "$large/config.json" ]; then
  verdict FAIL offload "the large model was not built (log: $work/logs/large_model.log)"
elif ! msg=$(train teacher_resident 120 "${teacher[@]}"); then
  verdict FAIL offload "run without offload failed: $msg"
elif ! msg=$(train teacher_offloaded 120 "${teacher[@]}" rlhf.offload_teacher_model=true); then
  verdict FAIL offload "run with offload failed: $msg"
else
  figures=$("$py" - "$work/runs/teacher_offloaded" "$work/runs/teacher_resident" <<'EOF'
import sys
from pathlib import Path

from anchorkd.monitor.report import read_logging_jsonl


def steps(run):
    return [r.metrics for r in read_logging_jsonl(Path(run) / "logging.jsonl") if r.split == "train" and "loss" in r.metrics]


off, on = steps(sys.argv[1]), steps(sys.argv[2])
same = len(off) == len(on) > 0 and all(abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]) for a, b in zip(off, on))
speed = lambda s: s[-1].get("train_speed(s/it)", float("nan"))  # noqa: E731
memory = lambda s: max(r.get("memory(GiB)", float("nan")) for r in s)  # noqa: E731
print(
    f"losses {'equal' if same else 'DIFFER'} over {len(off)} steps; s/step {speed(off):.3f} offloaded vs "
    f"{speed(on):.3f} resident ({speed(off) / speed(on) - 1:+.0%}); peak reserved {memory(off):.2f} GiB "
    f"offloaded vs {memory(on):.2f} GiB resident"
)
sys.exit(0 if same else 1)
EOF
  )
  if [ $? -eq 0 ]; then verdict PASS offload "$figures"; else verdict FAIL offload "$figures"; fi
fi

# --- training from the teacher cache vs the live separate teacher (the offload check's resident run) -------
cache="$work/runs/teacher_cache_k64"
if [ ! -f "$work/runs/teacher_resident/logging.jsonl" ]; then
  verdict FAIL teacher_cache "no live-teacher run to compare with (see the offload check)"
elif ! (cd "$work" && rm -rf "$cache" && timeout 180 "$py" -m anchorkd.cli teacher-cache --config "$demo_config" \
    --out "$cache" --k 64 "training.output_dir=$work/runs/teacher_cache_writer" training.add_version=false \
    training.eval_strategy=no "${teacher[@]}") > "$work/logs/teacher_cache_write.log" 2>&1; then
  verdict FAIL teacher_cache "anchorkd teacher-cache failed (log: $work/logs/teacher_cache_write.log)"
elif ! msg=$(train teacher_cached 120 "${teacher[@]}" "custom.teacher_cache=$cache"); then
  verdict FAIL teacher_cache "run from the cache failed: $msg"
else
  written=$(grep -m 1 'anchorkd: teacher cache' "$work/logs/teacher_cache_write.log" | cut -c 1-240)
  figures=$("$py" - "$work/runs/teacher_cached" "$work/runs/teacher_resident" "$work/logs/teacher_cached.log" <<'EOF'
import sys
from pathlib import Path

from anchorkd.monitor.report import read_logging_jsonl


def steps(run):
    return [r.metrics for r in read_logging_jsonl(Path(run) / "logging.jsonl") if r.split == "train" and "loss" in r.metrics]


cached, live = steps(sys.argv[1]), steps(sys.argv[2])
no_teacher = "no teacher runs" in Path(sys.argv[3]).read_text(errors="replace")
speed = lambda s: s[-1].get("train_speed(s/it)", float("nan"))  # noqa: E731
memory = lambda s: max(r.get("memory(GiB)", float("nan")) for r in s)  # noqa: E731
print(
    f"{len(cached)} steps; s/step {speed(cached):.3f} cached vs {speed(live):.3f} live separate teacher "
    f"({speed(cached) / speed(live) - 1:+.0%}); peak reserved {memory(cached):.2f} GiB cached vs "
    f"{memory(live):.2f} GiB live ({memory(cached) - memory(live):+.2f} GiB); teacher loaded: "
    f"{'no' if no_teacher else 'YES'}"
)
sys.exit(0 if len(cached) == len(live) > 0 and no_teacher and memory(cached) < memory(live) else 1)
EOF
  )
  if [ $? -eq 0 ]; then verdict PASS teacher_cache "$figures; ${written#anchorkd: }"
  else verdict FAIL teacher_cache "$figures; ${written#anchorkd: }"; fi
fi

# --- bench/kd_step.py on the GPU ------------------------------------------------------------------------
# One round at sequence length 1800 (where the KD terms cost most) keeps it within the 8 minutes.
if timeout 210 "$py" "$root/bench/kd_step.py" --model-size large --dtype bf16 --rounds 1 --steps 4 \
  --seq-lens 1800 --budget-s 150 --no-floor --json "$work/kd_step.json" --workdir "$work/kd_step" > "$work/logs/kd_step.log" 2>&1; then
  figures=$("$py" - "$work/kd_step.json" <<'EOF'
import json
import sys

payload = json.load(open(sys.argv[1]))
targets = payload.get("targets", {})
parts, ok = [], True
for row in payload["runs"]:
    if row.get("time_ratio") is None or row["variant"] == "stock_sft":
        continue
    text = f"{row['seq_len']}/{row['variant']} time x{row['time_ratio']:.2f} mem x{row['memory_ratio']:.2f}"
    for metric in ("time_ratio", "memory_ratio"):
        limit = targets.get(f"{row['variant']}.{metric}")
        if limit is not None and row[metric] > limit:
            ok = False
            text += f" ({metric} over {limit})"
    parts.append(text)
skipped = payload.get("skipped", [])
measured = bool(parts)
if not measured:
    reason = skipped[0]["skipped"] if skipped else "no runs"
    parts.append(f"no ratios measured ({len(skipped)} runs skipped; first: {reason[:200]})")
elif skipped:
    parts.append(f"{len(skipped)} runs skipped (time budget or failure: see the log)")
print("; ".join(parts) + (" [targets met]" if ok and not skipped else ""))
sys.exit(0 if ok and measured else 1)
EOF
  )
  if [ $? -eq 0 ]; then verdict PASS kd_step "$figures"; else verdict FAIL kd_step "$figures"; fi
else
  verdict FAIL kd_step "bench/kd_step.py failed or timed out (log: $work/logs/kd_step.log)"
fi

echo "gpu_check: done in $(( $(date +%s) - started )) s; verdicts in $work/verdicts.txt"
