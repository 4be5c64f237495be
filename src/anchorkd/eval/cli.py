"""``anchorkd eval ...`` sub-commands: argument parsing only, the work is in the modules they call.

Exit statuses: 0 success; 2 bad input (missing checkpoint / adapter / data file, a bad line in a data or
generations file -- the message names the path, or ``file:line``); 3 (``eval text`` only) the text
perplexity rose by more than ``--max-regression-pct`` against the base. Heavy libraries (torch,
ms-swift) are imported inside the handlers, so ``anchorkd --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

EXIT_STATUSES = (
    "exit status: 0 ok; 2 bad input (the message names the path, or file:line); "
    "3 (eval text) perplexity rose by more than --max-regression-pct vs the base"
)


def _run_spec(text: str) -> tuple[str, Path]:
    """``NAME=DIR`` of ``eval compare --run``."""
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name.strip(), Path(folder.strip())


def _scene_group_spec(text: str) -> tuple[str, list[str]]:
    """``NAME=SCENE[,SCENE...]`` of ``eval compare --scene-group``."""
    name, sep, scenes = text.partition("=")
    listed = [scene.strip() for scene in scenes.split(",") if scene.strip()]
    if not sep or not name.strip() or not listed:
        raise argparse.ArgumentTypeError(f"expected NAME=SCENE[,SCENE...], got {text!r}")
    return name.strip(), listed


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _adapter_scale(text: str) -> float:
    """``--adapter-scale``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .model import DEFAULT_EVAL_BATCH_SIZE, DEFAULT_MODEL_TYPE, TORCH_DTYPES

    parser.add_argument(
        "--model",
        required=True,
        help="model checkpoint folder (local); with --adapter, the weights it was trained on",
    )
    parser.add_argument("--adapter", help="LoRA adapter folder to apply (e.g. an ms-swift checkpoint-N)")
    parser.add_argument(
        "--adapter-scale",
        type=_adapter_scale,
        metavar="S",
        help="multiply the LoRA adapter's contribution by S >= 0 (default 1; 0 = the base model): "
        "WiSE-FT-style interpolation of the weights, recorded in the outputs",
    )
    parser.add_argument(
        "--model-type", default=DEFAULT_MODEL_TYPE, help=f"ms-swift model type (default {DEFAULT_MODEL_TYPE})"
    )
    parser.add_argument(
        "--torch-dtype", choices=TORCH_DTYPES, help="weights dtype (default: the checkpoint's own)"
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_EVAL_BATCH_SIZE,
        help=f"samples per forward (default {DEFAULT_EVAL_BATCH_SIZE})",
    )


def _add_infer_backend_option(parser: argparse.ArgumentParser) -> None:
    from .model import DEFAULT_INFER_BACKEND, INFER_BACKENDS

    parser.add_argument(
        "--infer-backend",
        choices=INFER_BACKENDS,
        default=DEFAULT_INFER_BACKEND,
        help=f"ms-swift inference engine (default {DEFAULT_INFER_BACKEND}; vllm only where it is installed)",
    )


def _cmd_generate(ns) -> int:
    from .generate import generate_captions

    path = generate_captions(
        ns.model,
        ns.adapter,
        ns.data,
        ns.out,
        batch_size=ns.batch_size,
        max_new_tokens=ns.max_new_tokens,
        limit=ns.limit,
        model_type=ns.model_type,
        torch_dtype=ns.torch_dtype,
        infer_backend=ns.infer_backend,
        adapter_scale=ns.adapter_scale,
    )
    print(f"anchorkd: captions in {path}")
    return 0


def _cmd_score(ns) -> int:
    from .score import score_generations, write_scores

    out = Path(ns.out) if ns.out else Path(ns.generations).parent
    scores = score_generations(ns.generations, ns.lexicon)
    path = write_scores(out, scores)
    print(json.dumps(scores["summary"], indent=2))
    print(f"anchorkd: scores in {path}")
    return 0


def _cmd_text(ns) -> int:
    from .score import TEXT_EVAL_FILE
    from .text_eval import EXIT_TEXT_REGRESSION, evaluate_text

    document = evaluate_text(
        ns.model,
        ns.adapter,
        ns.data,
        ns.out,
        base_model=ns.base,
        base_adapter=ns.base_adapter,
        base_text_eval=ns.base_text_eval,
        max_regression_pct=ns.max_regression_pct,
        batch_size=ns.batch_size,
        model_type=ns.model_type,
        torch_dtype=ns.torch_dtype,
        adapter_scale=ns.adapter_scale,
    )
    line = f"text perplexity {document['ppl']:.4g} over {document['tokens']} assistant tokens"
    if document["ppl_change_pct"] is not None:
        line += f", {document['ppl_change_pct']:+.2f}% vs base {document['base']['ppl']:.4g}"
    print(f"anchorkd: {line}; details in {Path(ns.out) / TEXT_EVAL_FILE}")
    if document["regressed"]:
        print(
            f"anchorkd: text perplexity regressed by more than {document['max_regression_pct']}% "
            f"(exit {EXIT_TEXT_REGRESSION})"
        )
        return EXIT_TEXT_REGRESSION
    return 0


def _cmd_compare(ns) -> int:
    from ..errors import ConfigError
    from .compare import compare_runs

    runs: dict[str, Path] = {}
    for name, folder in ns.run:
        if name in runs:
            raise ConfigError("--run", f"run name {name!r} is given twice")
        runs[name] = folder
    scene_groups: dict[str, list[str]] = {}
    for name, scenes in ns.scene_group or []:
        if name in scene_groups:
            raise ConfigError("--scene-group", f"group name {name!r} is given twice")
        scene_groups[name] = scenes
    compare_runs(
        runs,
        ns.out,
        base_name=ns.base_name,
        title=ns.title,
        scene_groups=scene_groups,
        drift_name=ns.drift_run,
    )
    print(f"anchorkd: report in {Path(ns.out) / 'report.md'}")
    return 0


def register(subparsers) -> None:
    """Add ``anchorkd eval {generate,score,text,compare}`` to the top-level sub-commands."""
    from .model import DEFAULT_MAX_NEW_TOKENS

    evaluation = subparsers.add_parser(
        "eval",
        help="evaluate checkpoints: captions, hallucination scores, text perplexity, comparison report",
        description="Evaluate checkpoints: generate -> score -> text -> compare (docs/evaluation.md).",
        epilog=EXIT_STATUSES,
    )
    commands = evaluation.add_subparsers(dest="eval_command", required=True, metavar="STEP")

    generate = commands.add_parser("generate", help="greedy captions for eval records (ms-swift template)")
    _add_model_options(generate)
    generate.add_argument(
        "--data", required=True, action="append", help="eval JSONL file (repeat for several)"
    )
    generate.add_argument("--out", required=True, help="folder for generations.jsonl")
    generate.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"caption length limit in tokens (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    generate.add_argument("--limit", type=_positive_int, help="only the first N records of each file")
    _add_infer_backend_option(generate)
    generate.set_defaults(handler=_cmd_generate)

    score = commands.add_parser("score", help="caption metrics of a generations.jsonl (no model needed)")
    score.add_argument("--generations", required=True, help="generations.jsonl from `eval generate`")
    score.add_argument(
        "--lexicon", help="object lexicon YAML (default configs/lexicons/telecom_default.yaml)"
    )
    score.add_argument("--out", help="folder for scores.json (default: the generations file's folder)")
    score.set_defaults(handler=_cmd_score)

    text = commands.add_parser("text", help="assistant-token perplexity on text chat, gated vs a base")
    _add_model_options(text)
    text.add_argument("--data", required=True, help="text-only chat JSONL (e.g. text_eval.jsonl)")
    text.add_argument("--out", required=True, help="folder for text_eval.json")
    base = text.add_mutually_exclusive_group()
    base.add_argument("--base", help="base checkpoint to compare with (measured on the same data)")
    base.add_argument(
        "--base-text-eval", help="text_eval.json of the base, measured earlier on the same data"
    )
    text.add_argument("--base-adapter", help="adapter applied to --base")
    text.add_argument(
        "--max-regression-pct",
        type=float,
        default=5.0,
        help="exit 3 when perplexity rises by more than this %% vs the base (default 5)",
    )
    text.set_defaults(handler=_cmd_text)

    compare = commands.add_parser("compare", help="report comparing evaluation folders")
    compare.add_argument(
        "--run", required=True, action="append", type=_run_spec, metavar="NAME=DIR", help="repeat per run"
    )
    compare.add_argument("--base-name", default="base", help="run that the perplexity change refers to")
    compare.add_argument("--out", required=True, help="report folder")
    compare.add_argument("--title", default="anchorkd evaluation report")
    compare.add_argument(
        "--scene-group",
        action="append",
        type=_scene_group_spec,
        metavar="NAME=SCENE[,SCENE...]",
        help="add the OOD rate pooled over these scenes as ood_domain_object_rate_NAME (repeat per group)",
    )
    compare.add_argument(
        "--drift-run",
        metavar="NAME",
        help="the drifting run (vanilla SFT): adds ood_excess_removed[_GROUP] = (drift - run) / (drift - base)",
    )
    compare.set_defaults(handler=_cmd_compare)
