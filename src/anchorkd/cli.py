"""``anchorkd`` command line: a thin layer over the package's functions."""

from __future__ import annotations

import argparse
import logging
import sys

from .offline import configure_network

EXIT_BAD_INPUT = 2


# The testbed's domain runs, its default selection and its named selections (demo.testbed.DOMAIN_RUNS,
# DEFAULT_RUNS and RUN_GROUPS; kept here so that `anchorkd --help` imports no demo code).
DEMO_RUNS = (
    "sft",
    "gkd",
    "gkd_visual",
    "gkd_seqkd",
    "gkd_anchor",
    "gkd_anchor_w1",
    "gkd_anchor_w2",
    "gkd_anchor_aw1r025",
    "gkd_anchor_r025",
    "gkd_cached",
    "gkd_anchor_cached",
    "anchor_only",
    "replay",
    "sft_wise0.25",
    "sft_wise0.5",
    "sft_wise0.75",
)
DEFAULT_DEMO_RUNS = ("sft", "gkd", "gkd_anchor")
# "baselines": every run but the two extra KD variants (visual KD, seq_kd), the earlier anchor settings
# and the runs from the teacher cache, in DEMO_RUNS' order; "cache": the KD runs live
# and from the teacher cache, with SFT as reference.
DEMO_RUN_GROUPS = {
    "all": DEMO_RUNS,
    "baselines": tuple(
        run
        for run in DEMO_RUNS
        if run not in ("gkd_visual", "gkd_seqkd", "gkd_anchor_aw1r025", "gkd_anchor_r025")
        and not run.endswith("_cached")
    ),
    "cache": ("sft", "gkd", "gkd_cached", "gkd_anchor", "gkd_anchor_cached"),
}


def _torchrun_command(argv: list[str]) -> list[str] | None:
    """Under NPROC_PER_NODE (ms-swift's variables), the torchrun command that runs this one once per rank;
    None in a single process or in a torchrun worker."""
    import os

    if "LOCAL_RANK" in os.environ:
        return None  # already a torchrun worker
    from .swift_seam import torchrun_args as swift_torchrun_args

    torchrun_args = swift_torchrun_args()
    if torchrun_args is None:
        return None
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "anchorkd.cli", *argv]


def _cmd_train(ns) -> int:
    from .trainers.pipeline import run_training
    from .trainers.sharding import release_process_group

    relaunch = _torchrun_command(ns.argv)
    if relaunch is not None:
        import subprocess

        from .checks import check_run

        # Every check here first (for the world size the relaunch will have): a refusal is said once and
        # exits 2 before torchrun starts a rank, instead of once per rank and a torchrun traceback.
        check_run(ns.config, ns.overrides)
        print(f"anchorkd: launching {' '.join(relaunch)}", flush=True)
        return subprocess.call(relaunch)

    summary = run_training(ns.config, ns.overrides)
    release_process_group()  # this process exits next: tear the group down while Python is whole
    print(f"\nanchorkd: training finished ({summary['mode']}), outputs in {summary['output_dir']}")
    print(f"anchorkd: per-step metrics in {summary['logging_jsonl']}")
    if summary.get("last_checkpoint"):
        print(f"anchorkd: last checkpoint {summary['last_checkpoint']}")
    return 0


def _cmd_validate(ns) -> int:
    from .checkpoints import resume_plan
    from .checks import check_run
    from .config import ConfigLoader

    config = check_run(ns.config, ns.overrides)
    settings = ConfigLoader.build_settings(config, create_output_dir=False)
    anchor = settings.anchor
    print(f"{ns.config}: OK ({anchor.mode}, {type(settings.train_args).__name__})")
    print(
        f"  trainer_variant={anchor.trainer_variant} llm_kd_weight={anchor.llm_kd_weight} "
        f"visual_kd={'on' if anchor.visual_kd_active else 'off'} teacher={anchor.teacher_mode}"
        + (" seq_kd=on" if anchor.seq_kd else "")
    )
    resume = resume_plan(config)
    if resume is not None:
        print(f"  resumes from {resume.checkpoint} (step {resume.step}) into {resume.run_dir}")
    if ns.print:
        print(config.to_yaml())
    return 0


def _cmd_teacher_targets(ns) -> int:
    from .checks import check_run
    from .trainers.teacher_targets import export_teacher_targets

    # The data step of this config's seq_kd run: the same rules, teacher, settings and cache.
    config = check_run(ns.config, [*ns.overrides, "rlhf.seq_kd=true"], teacher=False)
    rows, stats = export_teacher_targets(config, ns.out)
    print(
        f"anchorkd: {rows} teacher answers in {ns.out} ({stats.generated} generated, "
        f"{stats.cached} from the cache, {stats.files_reused} data file(s) reused whole)"
    )
    if stats.truncated:
        print(f"anchorkd: {stats.truncated} answers stopped at rlhf.max_completion_length")
    return 0


def _cmd_teacher_cache(ns) -> int:
    from .checks import check_run
    from .trainers.teacher_cache import write_teacher_cache

    config = check_run(ns.config, ns.overrides, teacher_cache=False)  # the cache is what this writes
    stats = write_teacher_cache(config, ns.out, k=ns.k, batch_size=ns.batch_size)
    print(
        f"anchorkd: teacher cache {ns.out}: {stats.rows} rows ({stats.rows_written} written, "
        f"{stats.rows_cached} already cached), {stats.supervised_tokens} supervised tokens, "
        f"{stats.bytes_per_token:.1f} bytes per token, {stats.rows_per_second:.2f} rows/s, "
        f"mean teacher mass outside the top {ns.k}: {stats.mean_teacher_tail_mass:.4f}"
    )
    return 0


def _cmd_check(ns) -> int:
    from .checks import check_run
    from .trainers.preflight import run_preflight

    config = check_run(ns.config, ns.overrides, teacher=False)
    if config.mode != "gkd":
        print(f"{ns.config}: no teacher in this run ({config.mode}); nothing to compare")
        return 0
    checks = run_preflight(config)
    print(f"{ns.config}: teacher and student are compatible")
    for check in checks:
        print(f"  ok: {check}")
    return 0


def _cmd_make_tiny_model(ns) -> int:
    from .demo.tiny_model import make_tiny_model

    path = make_tiny_model(ns.out, seed=ns.seed)
    print(f"tiny Qwen3-VL checkpoint written to {path}")
    return 0


def _cmd_make_synthetic_data(ns) -> int:
    from .demo.synthetic import SyntheticSizes, make_synthetic_data

    sizes = SyntheticSizes.quick() if ns.quick else SyntheticSizes()
    files = make_synthetic_data(ns.out, seed=ns.seed, sizes=sizes, overwrite=ns.overwrite)
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


def _cmd_report(ns) -> int:
    from .monitor.report import make_telemetry_report

    summary = make_telemetry_report(ns.run_dir, ns.out, alert_config=_run_monitor_config(ns.run_dir))
    for path in summary["files"]:
        print(f"wrote {path}")
    print(f"from {summary['source']}")
    for path in summary["other_logs"]:
        print(f"  not included: {path} (another run's log)")
    print(
        f"{summary['records']} log records, last step {summary['last_step']}, {len(summary['alerts'])} alert(s)"
    )
    for alert in summary["alerts"]:
        print(f"  step {alert['step']}: {alert['message']}")
    return 0


def _run_monitor_config(run_dir: str):
    """The run's own ``custom.monitor`` thresholds, when its resolved config is there."""
    from .config.loader import RESOLVED_CONFIG_NAME
    from .config.settings import monitor_settings_of_run
    from .monitor.report import find_logging_jsonl

    resolved = find_logging_jsonl(run_dir).parent / RESOLVED_CONFIG_NAME
    return monitor_settings_of_run(resolved) if resolved.is_file() else None


def _cmd_demo(ns) -> int:
    from .demo.testbed import HEADLINE_METRICS, TestbedSizes, run_testbed

    sizes = TestbedSizes.quick() if ns.quick else TestbedSizes()
    runs = tuple(dict.fromkeys(run for name in ns.runs for run in DEMO_RUN_GROUPS.get(name, (name,))))
    result = run_testbed(ns.root, ns.configs, seeds=tuple(ns.seeds), sizes=sizes, runs=runs)
    print(
        f"\nanchorkd demo: {'base reused from cache' if result.base_cached else 'base trained'}, "
        f"total {result.timings_s.get('total', 0):.0f} s"
    )
    header = ["run", *HEADLINE_METRICS]
    print(" | ".join(header))
    for name, metrics in result.runs.items():
        cells = [name]
        for key in HEADLINE_METRICS:
            value, spread = metrics.get(key), metrics.get(f"{key}_std")
            cells.append("n/a" if value is None else f"{value:.3f}" + (f"±{spread:.3f}" if spread else ""))
        print(" | ".join(cells))
    print(f"\nanchorkd demo: report in {result.report_dir / 'report.md'} (+ report.json, PNG charts)")
    return 0


def _cmd_prepare_demo(ns) -> int:
    from .demo.assets import prepare_demo_assets

    for name, path in prepare_demo_assets(ns.root, seed=ns.seed, quick=ns.quick).items():
        print(f"{name}: {path}")
    return 0


def _cmd_configs_list(ns) -> int:
    from .shipped_configs import list_shipped_configs

    configs = list_shipped_configs()
    width = max(len(c.name) for c in configs)
    for config in configs:
        print(f"{config.name:<{width}}  {config.description}".rstrip())
    return 0


def _cmd_configs_copy(ns) -> int:
    from .shipped_configs import copy_shipped_config

    try:
        copied = copy_shipped_config(ns.name, ns.dest, force=ns.force, make_parents=ns.make_parents)
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"anchorkd: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    how = f"flattened from {len(copied.merged_from)} files" if copied.merged_from else "verbatim"
    print(f"copied {copied.source.name} to {copied.target} ({how})")
    return 0


def _cmd_anchors_build(ns) -> int:
    from pathlib import Path

    from .data.anchor_set import AnchorSetRequest, build_anchor_set, describe, parse_shares

    request = AnchorSetRequest(
        train=tuple(Path(p) for p in ns.train),
        out=Path(ns.out),
        images=tuple(Path(p) for p in ns.images),
        evals=tuple(Path(p) for p in ns.eval),
        rows=ns.rows,
        shares=parse_shares(ns.share),
        general_prompts=Path(ns.general_prompts) if ns.general_prompts else None,
        text_questions=Path(ns.text_questions) if ns.text_questions else None,
        seed=ns.seed,
        force=ns.force,
    )
    for line in describe(build_anchor_set(request)):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anchorkd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    def config_command(name: str, help_text: str, handler):
        """A command on a config: ``anchorkd NAME FILE [overrides]`` or ``anchorkd NAME --config FILE [overrides]``."""
        cmd = sub.add_parser(
            name,
            help=help_text,
            usage=f"anchorkd {name} [options] (FILE | --config FILE) [section.key=value ...]",
        )
        cmd.add_argument(
            "config_arguments",
            nargs="*",
            metavar="[FILE] section.key=value",
            help="the YAML config file (unless --config names it), then config overrides",
        )
        cmd.add_argument(
            "--config", dest="config_option", metavar="FILE", help="the YAML config file (the same as FILE)"
        )
        cmd.set_defaults(handler=handler)
        return cmd

    config_command("train", "train from a config (ms-swift, in-process)", _cmd_train)
    validate = config_command("validate", "check a config (and its data) without training", _cmd_validate)
    validate.add_argument("--print", action="store_true", help="print the resolved config")
    config_command("check", "teacher/student compatibility preflight", _cmd_check)
    targets = config_command(
        "teacher-targets",
        "write the teacher's answers to the config's data.dataset rows (the data of seq_kd) to a JSONL",
        _cmd_teacher_targets,
    )
    targets.add_argument("--out", required=True, help="ms-swift JSONL to write (rows with provenance)")
    cache = config_command(
        "teacher-cache",
        "cache the teacher's top-k distributions at every supervised position of the training and anchor rows",
        _cmd_teacher_cache,
    )
    cache.add_argument(
        "--out", required=True, help="cache folder (safetensors shards; see docs/teacher_cache.md)"
    )
    cache.add_argument("--k", type=int, default=64, help="teacher tokens kept per position (default 64)")
    cache.add_argument("--batch-size", type=int, default=4, help="rows per teacher forward (default 4)")

    tiny = sub.add_parser("make-tiny-model", help="build the embedded tiny Qwen3-VL checkpoint")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=_cmd_make_tiny_model)

    data = sub.add_parser("make-synthetic-data", help="write the synthetic dense-caption data set")
    data.add_argument("out")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    data.add_argument("--overwrite", action="store_true")
    data.set_defaults(handler=_cmd_make_synthetic_data)

    report = sub.add_parser("report", help="plot a run's logging.jsonl and list its alerts")
    report.add_argument("run_dir", help="training output dir (or its logging.jsonl)")
    report.add_argument("--out", default=None, help="where to write (default: the run dir)")
    report.set_defaults(handler=_cmd_report)

    demo = sub.add_parser(
        "demo", help="the anchoring testbed on the embedded default: base, SFT, GKD, report"
    )
    demo.add_argument("--quick", action="store_true", help="tiny sizes that only check the chain (tests)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="domain-run seeds (spread)")
    demo.add_argument(
        "--runs",
        nargs="+",
        default=list(DEFAULT_DEMO_RUNS),
        choices=[*DEMO_RUNS, *DEMO_RUN_GROUPS],
        help=f"domain runs (default: {' '.join(DEFAULT_DEMO_RUNS)}); "
        + "; ".join(f"{group}: {' '.join(runs)}" for group, runs in DEMO_RUN_GROUPS.items())
        + " (the sft_wise runs evaluate sft's adapter scaled, so they bring sft along)",
    )
    demo.add_argument("--root", default="outputs/testbed", help="where assets, cache, runs and the report go")
    demo.add_argument(
        "--configs", default=None, help="testbed recipe folder (default: the shipped testbed/ configs)"
    )
    demo.set_defaults(handler=_cmd_demo)

    demo_assets = sub.add_parser("prepare-demo", help="build (or reuse) the tiny model and synthetic data")
    demo_assets.add_argument("--root", default="outputs/demo")
    demo_assets.add_argument("--seed", type=int, default=0)
    demo_assets.add_argument("--quick", action="store_true", help="tiny data sizes (tests)")
    demo_assets.set_defaults(handler=_cmd_prepare_demo)

    configs = sub.add_parser("configs", help="list the shipped configs, or copy one to start from")
    configs_sub = configs.add_subparsers(dest="configs_command", required=True)
    configs_list = configs_sub.add_parser("list", help="each shipped config's name and first comment line")
    configs_list.set_defaults(handler=_cmd_configs_list)
    copy = configs_sub.add_parser(
        "copy", help="copy a shipped config (flattened when it extends others) to a file or folder"
    )
    copy.add_argument("name", help="a name from `anchorkd configs list` (.yaml may be left off)")
    copy.add_argument("dest", help="file to write, or an existing folder to copy into")
    copy.add_argument("--force", action="store_true", help="overwrite an existing file")
    copy.add_argument("--make-parents", action="store_true", help="create missing parent folders")
    copy.set_defaults(handler=_cmd_configs_copy)

    anchors = sub.add_parser("anchors", help="build a prompt-only anchor set (custom.anchor) from your data")
    anchors_sub = anchors.add_subparsers(dest="anchors_command", required=True)
    build = anchors_sub.add_parser(
        "build",
        help="your training prompts and general prompts on off-domain images, plus text questions",
        description="Write a prompt-only anchor set (ms-swift JSONL for custom.anchor.dataset; the base "
        "answers its rows before training) and OUT's .summary.json beside it.",
    )
    build.add_argument(
        "--train",
        nargs="+",
        action="extend",
        required=True,
        metavar="JSONL",
        help="the training set's ms-swift JSONL file(s): their prompts, and images to leave out",
    )
    build.add_argument(
        "--images",
        nargs="+",
        action="extend",
        default=[],
        metavar="SOURCE",
        help="off-domain images: folder(s) (searched recursively) or JSONL file(s) listing them",
    )
    build.add_argument(
        "--eval",
        nargs="+",
        action="extend",
        default=[],
        metavar="JSONL",
        help="eval sets (JSONL or image folders) whose images must not be anchors",
    )
    build.add_argument("--out", required=True, help="the anchor set to write (.jsonl)")
    build.add_argument("--rows", type=int, default=400, help="rows in the anchor set (default: 400)")
    build.add_argument(
        "--share",
        default="training_prompts=0.5,general=0.25,text=0.25",
        metavar="KIND=SHARE,...",
        help="each kind's share of the rows, adding up to 1 (default: %(default)s)",
    )
    build.add_argument(
        "--general-prompts",
        default=None,
        metavar="FILE",
        help="general prompts, .txt (one per line) or .jsonl (default: the shipped list)",
    )
    build.add_argument(
        "--text-questions",
        default=None,
        metavar="FILE",
        help="text-only questions, .txt (one per line) or .jsonl (default: the shipped list)",
    )
    build.add_argument("--seed", type=int, default=0, help="seed of the draws of images and prompts")
    build.add_argument("--force", action="store_true", help="overwrite an existing anchor set and summary")
    build.set_defaults(handler=_cmd_anchors_build)

    _register_optional(sub)
    return parser


def _register_optional(sub) -> None:
    """Commands whose modules register themselves (evaluation, demo, reports)."""
    from . import commands

    for register in commands.REGISTRARS:
        register(sub)


def _looks_like_override(text: str) -> bool:
    """``section.key=value``: an ``=`` with no path separator before it."""
    key, sep, _ = text.partition("=")
    return bool(sep) and "/" not in key and "\\" not in key


def _names_a_config_file(text: str) -> bool:
    from pathlib import Path

    return text.endswith((".yaml", ".yml")) or Path(text).is_file()


class _CommandParser(argparse.ArgumentParser):
    """The parser of each command: on a command that takes a config, ``FILE`` or ``--config FILE`` end up in
    ``ns.config`` and the overrides in ``ns.overrides`` (see :func:`_settle_config_file`)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if hasattr(namespace, "config_arguments"):
            _settle_config_file(namespace, self)
        return namespace, extras


def _settle_config_file(ns, parser: argparse.ArgumentParser) -> None:
    """``ns.config`` and ``ns.overrides`` from ``FILE`` or ``--config FILE``; both, or neither, is a usage error
    (exit status 2). Beside ``--config``, a first argument that is not an override counts as a second config
    file when it names one (``.yaml``/``.yml``, or an existing file); otherwise it stays an override, for the
    override check to name."""
    arguments, option = list(ns.config_arguments), ns.config_option
    first = arguments[0] if arguments else None
    positional = first is not None and not _looks_like_override(first)
    if option is not None and positional and _names_a_config_file(first):
        parser.error(f"the config file is given twice ({first} and --config {option}): give one")
    if option is None and not positional:
        parser.error("a config file is required: FILE or --config FILE, before any section.key=value")
    if option is None:
        ns.config, ns.overrides = arguments[0], arguments[1:]
    else:
        ns.config, ns.overrides = option, arguments


def _console_logging() -> None:
    """anchorkd's own console handler: ms-swift raises the root handler to ERROR when it sets up its
    logger, which would hide our warnings (forward-only knobs, alerts, non-finite terms)."""
    logger = logging.getLogger("anchorkd")
    if not any(getattr(h, "_anchorkd", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[anchorkd] %(levelname)s %(message)s"))
        handler._anchorkd = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    configure_network()
    _console_logging()
    argv = sys.argv[1:] if argv is None else argv
    ns = build_parser().parse_args(argv)
    ns.argv = argv
    from .errors import AnchorKDError, ConfigError, DataError

    try:
        return ns.handler(ns)
    except (AnchorKDError, FileExistsError, FileNotFoundError) as exc:
        if not (isinstance(exc, ConfigError | DataError) and _other_torchrun_rank()):
            print(f"anchorkd: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _other_torchrun_rank() -> bool:
    """A torchrun worker other than rank 0: every rank checks the same config and data, and rank 0 says
    what is wrong with them (once, not once per rank)."""
    import os

    return "LOCAL_RANK" in os.environ and os.environ.get("RANK", "0") != "0"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
