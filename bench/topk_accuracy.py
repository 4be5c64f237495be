"""Accuracy of the top-k + tail JSD (anchorkd.losses.topk) against the exact JSD, in float64.

Random logits at Qwen3-VL's vocabulary (V = 151,936): teachers with Gaussian logits (N(0, 3^2), which over
this vocabulary is a flat distribution: 56 % of the mass outside the top 128) and with Zipf-ranked logits
(``p ~ rank^-a``, a = 1.5 and 2, a language model's long tail), each with a student near it (teacher logits
+ N(0, 1)), as a distilled or anchored student is. The teacher is stored as the cache stores it (fp16
log-probs, fp32 tail), the loss is evaluated in float64 through ``reference_topk_jsd`` (the fused loss
equals it to 1e-5 relative, tests/unit/test_losses_topk.py), and compared to ``generalized_jsd``:

* value: ``(exact - top-k) / exact`` of the batch-mean JSD (>= 0 by the data-processing inequality);
* gradient: ``|| d top-k / d z - d exact / d z || / || d exact / d z ||`` over all logits ``z``.

    python bench/topk_accuracy.py [--positions 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from anchorkd.losses.jsd import generalized_jsd
from anchorkd.losses.topk import TeacherTopK, reference_topk_jsd, teacher_topk

VOCAB = 151_936
KS = (1, 8, 32, 64, 128)
BETAS = (0.0, 0.5, 1.0)


def teachers(positions: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Teacher logits ``[positions, V]``: Gaussian (flat over this vocabulary: the worst case) and Zipf
    ranks (``p ~ rank^-a``, each position a random permutation, as a language model's long tail)."""
    gaussian = 3 * torch.randn(positions, VOCAB, generator=gen, dtype=torch.float64)
    ranks = torch.stack([torch.randperm(VOCAB, generator=gen) for _ in range(positions)]) + 1
    zipf = {
        f"Zipf a={a}": -a * ranks.double().log()
        + 0.1 * torch.randn(positions, VOCAB, generator=gen, dtype=torch.float64)
        for a in (1.5, 2.0)
    }
    return {"Gaussian std 3": gaussian, **zipf}


def measure(positions: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for teacher_name, teacher_logits in teachers(positions, gen).items():
        # A student near its teacher, as a distilled or anchored student is.
        student_logits = teacher_logits + torch.randn(positions, VOCAB, generator=gen, dtype=torch.float64)
        for beta in BETAS:
            logits = student_logits.clone().requires_grad_()
            exact = generalized_jsd(logits, teacher_logits, beta=beta)
            (exact_grad,) = torch.autograd.grad(exact, logits)
            for k in KS:
                top = teacher_topk(teacher_logits, k)
                stored = TeacherTopK(top.logprobs.half(), top.ids.int(), top.log_tail.float())
                approx = reference_topk_jsd(logits, stored, beta=beta)
                (grad,) = torch.autograd.grad(approx, logits)
                rows.append(
                    {
                        "teacher": teacher_name,
                        "beta": beta,
                        "k": k,
                        "exact_jsd": exact.item(),
                        "teacher_tail_mass": top.log_tail.exp().mean().item(),
                        "value_rel_error": ((exact - approx) / exact).item(),
                        "grad_rel_error": ((grad - exact_grad).norm() / exact_grad.norm()).item(),
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--positions", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = measure(args.positions)
    by_key = {(r["teacher"], r["k"], r["beta"]): r for r in rows}
    header = " | ".join(f"beta {b}: value / grad" for b in BETAS)
    print(f"| teacher | k | teacher tail mass | {header} |")
    print("|---|---|---|" + "---|" * len(BETAS))
    for teacher_name in dict.fromkeys(r["teacher"] for r in rows):
        for k in KS:
            cells = [by_key[(teacher_name, k, b)] for b in BETAS]
            errors = " | ".join(f"{c['value_rel_error']:.1e} / {c['grad_rel_error']:.1e}" for c in cells)
            print(f"| {teacher_name} | {k} | {cells[0]['teacher_tail_mass']:.3g} | {errors} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
