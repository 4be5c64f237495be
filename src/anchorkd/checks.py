"""The complete set of checks a run passes before any model is loaded or any file is written.

``anchorkd validate``, ``anchorkd check`` and the start of ``anchorkd train`` all call ``check_run``:
1. the config: keys, types, every rule of ``anchorkd.config.rules``, checkpoints (``ConfigLoader``);
   what the checkpoints' own files tell: LoRA targets, model type, resume settings (``anchorkd.checkpoint_rules``);
2. the data: every line of every local data file, anchor prompts included (``anchorkd.data.validate``),
   and the rows the teacher will answer (seq_kd, anchor prompts without an answer) as it will prompt them;
3. for runs with a teacher: teacher / student compatibility (``anchorkd.trainers.preflight``).

The rules on values ms-swift derives (rows per generation buffer, ``accelerator_config`` under DeepSpeed)
are config rules computed from the config (``anchorkd.config.rules``), so they run here too: in
``teacher-targets`` and before ``train`` loads a teacher or writes its answers. Nothing here builds
ms-swift's argument objects, which would start a process group in a torchrun worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .checkpoint_rules import check_checkpoint_rules
from .config import ConfigLoader, ResolvedConfig
from .errors import DataError


def data_rules(config: ResolvedConfig):
    """The data rules that apply to this run: row lengths against ``template.max_length`` (counted with
    the student's tokenizer when it is a local folder) and, for anchorkd's GKD trainer, no OPSD rows."""
    from .data.validate import DataRules

    template, model = config.sections["template"], config.sections["model"]
    student = Path(str(model.get("model", ""))).expanduser()
    return DataRules(
        max_length=template.get("max_length"),
        tokenizer_dir=student if (student / "tokenizer.json").is_file() else None,
        max_pixels=template.get("max_pixels"),
        truncation_strategy=template.get("truncation_strategy"),
        refuse_opsd=config.mode == "gkd" and config.custom.trainer_variant == "gkd_monitor",
    )


def check_data(config: ResolvedConfig) -> None:
    from .data.validate import validate_dataset_entry

    rules = data_rules(config)
    data = config.sections["data"]
    for key in ("dataset", "val_dataset"):
        for i, entry in enumerate(data.get(key, []) or []):
            validate_dataset_entry(entry, key_path=f"data.{key}[{i}]", rules=rules)
    if config.mode == "gkd":
        # The anchor prompts: the same rules (a row may end without an assistant turn: the teacher answers it).
        for i, entry in enumerate(config.custom.anchor.dataset):
            validate_dataset_entry(entry, key_path=f"custom.anchor.dataset[{i}]", rules=rules)
    check_teacher_prompts(config)


def check_teacher_prompts(config: ResolvedConfig) -> None:
    """The rows the teacher answers before training (every ``data.dataset`` row with seq_kd, the anchor rows
    without an answer) are prompts it can take: a user turn, and no content that its generation leaves out.
    The teacher-target writer refuses them too, but only after it has loaded the teacher and written to its
    cache."""
    if config.mode != "gkd":
        return
    answered = (
        [(entry, False) for entry in config.sections["data"].get("dataset") or []] if config.seq_kd else []
    )
    answered += [(entry, True) for entry in config.custom.anchor.dataset]
    if not answered:
        return
    from .data.validate import iter_data_rows
    from .eval.generate import sample_from_record
    from .trainers.teacher_targets import UNSUPPORTED_ROW_KEYS, has_answer

    for entry, keeps_answers in answered:
        path = Path(entry).expanduser()
        for place, record in iter_data_rows(path):
            if keeps_answers and has_answer(record):
                continue
            unsupported = [key for key in UNSUPPORTED_ROW_KEYS if record.get(key)]
            if unsupported:
                raise place.error(
                    path,
                    "the teacher is prompted with messages and images only (seq_kd, anchor prompts); this "
                    f"row also has {unsupported[0]!r}",
                )
            try:
                sample_from_record(record, path, place.line)
            except DataError as error:
                raise place.locate(error) from None


def check_run(
    path: str | Path, overrides: Iterable[str] = (), *, teacher: bool = True, teacher_cache: bool = True
) -> ResolvedConfig:
    """Resolve ``path`` and run every check; raises ConfigError / DataError naming the key or file:line.
    ``teacher_cache=False``: leave ``custom.teacher_cache`` unchecked (``anchorkd teacher-cache`` writes it)."""
    config = ConfigLoader.resolve(path, overrides)
    check_checkpoint_rules(config)  # LoRA targets, model type, resume settings: the checkpoints' own files
    check_data(config)
    if teacher_cache and config.mode == "gkd" and config.custom.teacher_cache:
        from .trainers.teacher_cache import open_for_config

        open_for_config(config)  # written for this run's settings (the rows are checked by the trainer)
    if teacher and config.mode == "gkd":
        from .trainers.preflight import run_preflight

        run_preflight(config)
    return config
