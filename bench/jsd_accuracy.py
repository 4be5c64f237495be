"""Accuracy of the JSD in fp32 where student and teacher nearly agree (the start of every LoRA run).

Student logits ``h @ W.T``, teacher logits ``h @ (W + eps D).T`` (a small perturbation of the LM head), for
several ``eps`` and betas. Columns: the JSD per position (float64 oracle: the reference on float64 inputs),
then the relative error in fp32 of

* ``reference``  :func:`anchorkd.losses.generalized_jsd`, the full-logits form ``sum p (s - log m)`` of
  ms-swift and trl (what the fused loss computed before it was written with the log-ratio);
* ``fused``      :func:`anchorkd.losses.fused_ce_jsd`, written with ``u = log q - log p`` from the logit
  difference, ``expm1`` and ``log1p``;

and the fused gradient's relative error (Frobenius norm, w.r.t. the hidden states), which the fp32 logits
bound either way. Example::

    PYTHONPATH=src python bench/jsd_accuracy.py --vocab 151936 --rows 64
"""

from __future__ import annotations

import argparse

import torch

from anchorkd.losses import fused_ce_jsd, generalized_jsd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.1, 0.5, 1.0])
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.rows, args.hidden, generator=gen)
    weight = torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5 * 4
    direction = torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden**-0.5 * 4
    labels = torch.randint(0, args.vocab, (args.rows,), generator=gen)
    print(
        "| eps | beta | JSD (float64) | reference fp32 rel. error | fused fp32 rel. error | fused grad rel. error |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for eps in args.eps:
        teacher_weight = weight + eps * direction
        for beta in args.betas:
            h64 = hidden.double().requires_grad_()
            oracle = generalized_jsd(
                h64 @ weight.double().T, hidden.double() @ teacher_weight.double().T, labels, beta=beta
            )
            oracle.backward()
            want = float(oracle.detach())
            reference = float(
                generalized_jsd(hidden @ weight.T, hidden @ teacher_weight.T, labels, beta=beta)
            )
            h = hidden.clone().requires_grad_()
            fused = fused_ce_jsd(h, weight, labels, hidden, teacher_weight, beta=beta, compute_ce=False)
            fused.jsd.backward()
            grad_error = float((h.grad.double() - h64.grad).norm() / h64.grad.norm())
            print(
                f"| {eps:g} | {beta:g} | {want:.3e} | {abs(reference - want) / want:.1e} | "
                f"{abs(float(fused.jsd.detach()) - want) / want:.1e} | {grad_error:.1e} |"
            )


if __name__ == "__main__":
    main()
