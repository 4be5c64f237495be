"""The complete set of checks a run passes before any model is loaded or any file is written.

``anchorkd validate``, ``anchorkd check`` and the start of ``anchorkd train`` all call ``check_run``:
1. the config: keys, types, every rule of ``anchorkd.config.rules``, checkpoints (``ConfigLoader``);
   what the checkpoints' own files tell: LoRA targets, model type, resume settings (``anchorkd.checkpoint_rules``);
2. the data: every line of every local data file, anchor prompts included (``anchorkd.data.validate``);
3. for runs with a teacher: teacher / student compatibility (``anchorkd.trainers.preflight``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .checkpoint_rules import check_checkpoint_rules
from .config import ConfigLoader, ResolvedConfig


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


def check_run(path: str | Path, overrides: Iterable[str] = (), *, teacher: bool = True) -> ResolvedConfig:
    """Resolve ``path`` and run every check; raises ConfigError / DataError naming the key or file:line."""
    config = ConfigLoader.resolve(path, overrides)
    check_checkpoint_rules(config)  # LoRA targets, model type, resume settings: the checkpoints' own files
    check_data(config)
    if teacher and config.mode == "gkd":
        from .trainers.preflight import run_preflight

        run_preflight(config)
    return config
