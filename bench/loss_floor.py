"""Micro-benchmark of the loss "floor": LM head + CE / JSD, forward + backward, on CPU.

Every variant runs in its own subprocess so that its peak RSS is measured in isolation
(``ru_maxrss`` at the end minus the RSS right after the inputs were built).

Variants (N valid positions, vocab V, hidden H; student and teacher heads both [V, H]):

* ``ce_plain``       logits = h @ W.T, F.cross_entropy (the SFT baseline)
* ``swift_jsd_ce``   full logits, ms-swift ``jsd_loss`` (beta) / N + CE
* ``fused_jsd_ce``   :func:`anchorkd.losses.fused_ce_jsd` jsd + ce, beta as given
* ``fused_beta0``    same, beta = 0 (forward KL)
* ``fused_beta1``    same, beta = 1 (reverse KL)
* ``fused_jsd``      fused JSD only (ms-swift default sft_alpha = 0; CE still reported)
* ``fused_ce``       fused CE only (no teacher)

Columns: median / min wall seconds of one forward + backward, median process CPU seconds
(all threads; less sensitive than wall time to other load on the machine), median wall time
relative to ``ce_plain``, peak RSS delta. Children get ``OMP_WAIT_POLICY=PASSIVE`` unless set
(the anchorkd CLI default).

Example::

    PYTHONPATH=src python bench/loss_floor.py --n 1800 --vocab 151936 --hidden 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = (
    "ce_plain",
    "swift_jsd_ce",
    "fused_jsd_ce",
    "fused_beta0",
    "fused_beta1",
    "fused_jsd",
    "fused_ce",
)


def _ensure_src_on_path() -> None:
    """Let ``python bench/loss_floor.py`` work from a checkout without installing anchorkd."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _build_step(variant: str, args: argparse.Namespace):
    """Return a closure running one forward + backward of ``variant``."""
    import torch
    import torch.nn.functional as F

    from anchorkd.losses import fused_ce_jsd

    generator = torch.Generator().manual_seed(0)
    n, vocab, hidden = args.n, args.vocab, args.hidden
    student_hidden = torch.randn(n, hidden, generator=generator).requires_grad_()
    student_weight = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).requires_grad_()
    teacher_hidden = torch.randn(n, hidden, generator=generator)
    teacher_weight = torch.randn(vocab, hidden, generator=generator) / hidden**0.5
    labels = torch.randint(0, vocab, (n,), generator=generator)
    tau = args.temperature

    def zero_grads():
        student_hidden.grad = None
        student_weight.grad = None

    if variant == "ce_plain":

        def step():
            logits = student_hidden @ student_weight.T
            F.cross_entropy(logits, labels).backward()

    elif variant == "swift_jsd_ce":
        from swift.rlhf_trainers.gkd_loss import jsd_loss

        def step():
            logits = student_hidden @ student_weight.T
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            jsd = jsd_loss(logits / tau, teacher_logits / tau, args.beta) / n
            (jsd + F.cross_entropy(logits, labels)).backward()

    else:
        beta = {"fused_beta0": 0.0, "fused_beta1": 1.0}.get(variant, args.beta)
        ce_weight = 0.0 if variant == "fused_jsd" else 1.0
        jsd_weight = 0.0 if variant == "fused_ce" else 1.0
        compute_jsd = variant != "fused_ce"
        kwargs = {"chunk_size": args.chunk_size} if args.chunk_size else {}
        if args.block_rows:
            kwargs["block_rows"] = args.block_rows

        def step():
            out = fused_ce_jsd(
                student_hidden,
                student_weight,
                labels,
                teacher_hidden if compute_jsd else None,
                teacher_weight if compute_jsd else None,
                beta=beta,
                temperature=tau,
                compute_jsd=compute_jsd,
                **kwargs,
            )
            (jsd_weight * out.jsd + ce_weight * out.ce).backward()

    def run():
        zero_grads()
        step()

    return run


def _child(variant: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    run = _build_step(variant, args)
    rss_before = _current_rss_bytes()
    times, cpu_times = [], []
    for i in range(args.warmup + args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {
        "variant": variant,
        "min_s": min(times),
        "median_s": statistics.median(times),
        "median_cpu_s": statistics.median(cpu_times),
        "peak_rss_delta_mib": (_peak_rss_bytes() - rss_before) / 2**20,
    }


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1800, help="valid positions")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=0.9, help="ms-swift GKD default is 0.9")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=0, help="fused chunk_size (0: library default)")
    parser.add_argument("--block-rows", type=int, default=0, help="fused block_rows (0: automatic)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = _parse_args(argv)
    _ensure_src_on_path()
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return

    forwarded = list(argv if argv is not None else sys.argv[1:])
    # Same default as the anchorkd CLI: with more runnable threads than cores, OpenMP's
    # spin-waiting otherwise multiplies the CPU time of the many short element-wise ops.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    results = []
    for variant in args.variants:
        proc = subprocess.run(
            [sys.executable, __file__, *forwarded, "--child", variant],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    baseline = next((r["median_s"] for r in results if r["variant"] == "ce_plain"), None)
    print(
        f"N={args.n} V={args.vocab} H={args.hidden} beta={args.beta} temperature={args.temperature} "
        f"threads={args.threads} repeats={args.repeats}"
    )
    print(
        f"{'variant':<14} {'median s':>9} {'min s':>8} {'cpu s':>7} {'x ce_plain':>10} {'peak RSS +MiB':>14}"
    )
    for r in results:
        r["ratio_to_ce_plain"] = None if baseline is None else r["median_s"] / baseline
        ratio = "-" if baseline is None else f"{r['ratio_to_ce_plain']:.2f}"
        print(
            f"{r['variant']:<14} {r['median_s']:>9.3f} {r['min_s']:>8.3f} {r['median_cpu_s']:>7.2f} "
            f"{ratio:>10} {r['peak_rss_delta_mib']:>14.0f}"
        )
    if args.json:
        payload = {
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "child")},
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))


if __name__ == "__main__":
    main()
