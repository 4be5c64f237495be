"""Print the 1-process vs 2-process table on the embedded default: per-step telemetry and adapter agreement.

Runs a demo config (default: stage 3 GKD + visual KD) three ways on the same samples: 1 rank x batch 4,
1 rank x batch 2 x gradient accumulation 2, and 2 ranks x batch 2 (``NPROC_PER_NODE=2 anchorkd train``,
gloo on the CPU), then prints each logged term per step and the relative difference of the trained
adapters. Usage (from the repository root, after ``anchorkd prepare-demo --quick``):

    .venv/bin/python bench/data_parallel.py [--config configs/demo/stage_3_visual_kd.yaml] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TERMS = ("loss", "sft_loss", "llm_kd_loss", "vision_kd_loss", "token_accuracy", "token_count", "token_acc")
LAYOUTS = {"1x4": (1, 4, 1), "1x2x2": (1, 2, 2), "2x2": (2, 2, 1)}


def _train(config: str, out: Path, ranks: int, batch: int, accumulation: int, steps: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // ranks), "MASTER_PORT": str(port)}
    if ranks > 1:
        env["NPROC_PER_NODE"] = str(ranks)
    overrides = [
        f"training.output_dir={out}",
        f"training.max_steps={steps}",
        f"training.per_device_train_batch_size={batch}",
        f"training.gradient_accumulation_steps={accumulation}",
        f"training.save_steps={steps}",
        "training.eval_strategy=no",
        "training.add_version=false",
    ]
    command = [sys.executable, "-m", "anchorkd.cli", "train", "--config", config, *overrides]
    subprocess.run(command, env=env, check=True, capture_output=True)


def _steps(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    return [r for r in records if "global_step/max_steps" in r and "loss" in r]


def _adapter_difference(a: Path, b: Path, steps: int) -> float:
    from safetensors.torch import load_file

    first = load_file(a / f"checkpoint-{steps}" / "adapter_model.safetensors")
    second = load_file(b / f"checkpoint-{steps}" / "adapter_model.safetensors")
    return max(float((first[k] - second[k]).norm() / second[k].norm().clamp_min(1e-12)) for k in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo/stage_3_visual_kd.yaml")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anchorkd-dp-") as tmp:
        outs = {}
        for name, (ranks, batch, accumulation) in LAYOUTS.items():
            outs[name] = Path(tmp) / name
            _train(args.config, outs[name], ranks, batch, accumulation, args.steps)
        runs = {name: _steps(out) for name, out in outs.items()}
        terms = [t for t in TERMS if t in runs["1x4"][0]]
        print(f"config {args.config}, {args.steps} steps; relative difference vs 1x4 in brackets")
        print("| step | term | " + " | ".join(LAYOUTS) + " |")
        print("|---|---|" + "---:|" * len(LAYOUTS))
        for step in range(args.steps):
            for term in terms:
                reference = runs["1x4"][step][term]
                cells = []
                for name in LAYOUTS:
                    value = runs[name][step][term]
                    relative = abs(value - reference) / max(abs(reference), 1e-12)
                    cells.append(f"{value:.8g}" + ("" if name == "1x4" else f" ({relative:.1e})"))
                print(f"| {step + 1} | {term} | " + " | ".join(cells) + " |")
        for name in ("1x2x2", "2x2"):
            difference = _adapter_difference(outs[name], outs["1x4"], args.steps)
            print(f"adapter weights {name} vs 1x4: max relative difference {difference:.2e}")


if __name__ == "__main__":
    main()
