"""The contract of ``anchorkd.swift_seam``: every ms-swift / transformers internal it touches exists with the
shape it relies on. An upgrade of the pinned stack that moves one of them fails here, by name."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from anchorkd import swift_seam as seam


def source(obj) -> str:
    return inspect.getsource(obj)


def test_argument_classes_are_dataclasses_with_the_fields_anchorkd_sets():
    sft_cls, rlhf_cls = seam.arguments_classes()
    assert dataclasses.is_dataclass(sft_cls) and dataclasses.is_dataclass(rlhf_cls)
    rlhf_fields = seam.field_names(rlhf_cls)
    assert {"teacher_model", "teacher_model_type", "model_type", "rlhf_type", "beta", "lmbda"} <= rlhf_fields
    assert "llm_kd_weight" not in rlhf_fields | seam.field_names(sft_cls)
    # The adapter-disabled teacher is decided in RLHFArguments and forwarded by the pipeline.
    assert "self._teacher_use_disable_adapter = True" in source(rlhf_cls)
    _, swift_rlhf = seam.pipeline_classes()
    assert "_teacher_use_disable_adapter" in source(swift_rlhf._get_trainer_kwargs)


def test_section_dataclasses_declare_the_keys_of_their_section():
    declared = {
        section: set().union(*(seam.declared_fields(cls) for cls in classes))
        for section, classes in seam.section_dataclasses().items()
    }
    assert {"model", "model_type", "torch_dtype"} <= declared["model"]
    assert {"dataset", "val_dataset"} <= declared["data"]
    assert {"template", "max_length", "max_pixels"} <= declared["template"]
    assert {"lora_rank", "freeze_vit", "freeze_aligner"} <= declared["tuner"]


def test_swift_sft_run_builds_its_trainer_through_the_factory_and_the_train_hook():
    swift_sft, swift_rlhf = seam.pipeline_classes()
    run = source(swift_sft.run)
    assert "TrainerFactory.get_trainer_cls(args)" in run
    assert "self._get_trainer_kwargs()" in run
    assert "self.train(trainer)" in run
    assert issubclass(swift_rlhf, swift_sft) and "run" not in swift_rlhf.__dict__


class Marker:
    """A class ms-swift's factory can import by its dotted path (as it imports anchorkd's trainer)."""


def test_trainer_registration_is_scoped_to_the_block():
    from swift.trainers import Seq2SeqTrainer, TrainerFactory

    args = type("Args", (), {"task_type": "causal_lm"})()
    before = dict(TrainerFactory.TRAINER_MAPPING)
    with seam.trainer_class_registered(args, Marker):
        assert TrainerFactory.get_trainer_cls(args) is Marker
    assert before == TrainerFactory.TRAINER_MAPPING
    assert seam.stock_trainer_cls(args) is Seq2SeqTrainer


def test_trainer_registration_restores_the_table_when_the_block_fails():
    from swift.trainers import TrainerFactory

    args = type("Args", (), {"rlhf_type": "gkd"})()
    before = TrainerFactory.TRAINER_MAPPING["gkd"]
    with pytest.raises(RuntimeError), seam.trainer_class_registered(args, dict):
        raise RuntimeError("boom")
    assert TrainerFactory.TRAINER_MAPPING["gkd"] == before


def test_gkd_trainer_internals_used_by_the_window_annotation():
    gkd = seam.gkd_trainer_base()
    init, prepare = source(gkd.__init__), source(gkd._prepare_inputs)
    for attribute in ("self._step = 0", "self._buffered_inputs = None", "self._metrics = {"):
        assert attribute in init
    assert "steps_per_generation" in prepare and "self._buffered_inputs[" in prepare
    assert "def compute_loss(self, model, inputs" in source(gkd)


def test_gkd_hooks_and_sample_fields_the_anchor_prompts_use():
    """Anchor rows join a buffer in ``_rollout_samples``, are flagged through ``GKDSample.extra`` (an unknown
    row key lands there, survives the copies, and is never encoded), and are placed in micro-batches by
    ``split_by_mini_batches``, which ``_prepare_batch_inputs`` calls once with every sample."""
    import inspect as _inspect

    from swift.dataset import load_dataset
    from swift.rl_core.data import GKDSample

    gkd = seam.gkd_trainer_base()
    rollout = gkd._rollout_samples
    assert list(_inspect.signature(rollout).parameters) == ["self", "inputs"]
    assert "self.to_samples(inputs)" in source(rollout)
    # On-policy buffers strip every row's answer (resampling) and sample the student: anchor rows join after.
    assert "strip_response=self._data_source != DataSource.DATASET" in source(rollout)
    assert "samples = self._generate_completions(samples)" in source(rollout)
    assert "self.split_by_mini_batches(samples)" in source(gkd._prepare_batch_inputs)
    assert "self._rollout_samples(inputs)" in source(gkd._generate_and_score_completions)
    sample = GKDSample.from_row(
        {"messages": [{"role": "user", "content": "hi"}], "anchorkd_anchor_row": True}
    )
    assert sample.extra == {"anchorkd_anchor_row": True}
    assert "anchorkd_anchor_row" not in sample.to_template_dict()
    parameters = _inspect.signature(load_dataset).parameters
    assert {"split_dataset_ratio", "shuffle", "streaming"} <= set(parameters)


def test_gkd_batch_keys_and_data_source():
    from swift.rlhf_trainers.gkd_loss import DataSource

    builder = source(seam.gkd_trainer_base())
    for key in (seam.MODEL_INPUTS, seam.TEACHER_INPUTS, seam.GKD_BATCH):
        assert f"'{key}'" in builder
    assert {"STUDENT", "DATASET"} <= {member.name for member in DataSource}


def test_disable_gradient_checkpointing_signature():
    from swift.trainers import disable_gradient_checkpointing

    assert list(inspect.signature(disable_gradient_checkpointing).parameters) == [
        "model",
        "gradient_checkpointing_kwargs",
    ]


def test_progress_callback_pieces_the_precise_callback_reuses():
    from swift.trainers.patcher import ProgressCallbackNew, add_train_message
    from transformers import trainer as hf_trainer

    assert list(inspect.signature(add_train_message).parameters) == [
        "logs",
        "state",
        "start_time",
        "start_step",
    ]
    on_log = source(ProgressCallbackNew.on_log)
    assert "add_train_message(" in on_log and "logging.jsonl" in on_log and "append_to_jsonl" in on_log
    assert hf_trainer.DEFAULT_PROGRESS_CALLBACK is ProgressCallbackNew
    precise, stock = seam.precise_progress_callback(lambda key: True, lambda key, value: value)
    assert stock is ProgressCallbackNew and issubclass(precise, ProgressCallbackNew)


def test_hf_trainer_knob_for_a_loss_already_scaled_for_accumulation():
    from transformers import Trainer

    assert "loss_is_scaled_for_ga" in source(Trainer)


def test_torchrun_args_need_nproc_per_node(monkeypatch):
    for name in ("NPROC_PER_NODE", "NNODES"):
        monkeypatch.delenv(name, raising=False)
    assert seam.torchrun_args() is None
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    args = seam.torchrun_args()
    assert args is not None and "--nproc_per_node" in args and "2" in args


def test_inference_engines_take_the_arguments_load_model_passes():
    from swift.infer_engine import TransformersEngine

    passed = {"adapters", "model_type", "torch_dtype", "template_type"}
    assert passed | {"max_batch_size"} <= set(inspect.signature(TransformersEngine.__init__).parameters)
    # VllmEngine imports vllm on import, which need not be installed: read its constructor's source instead.
    import importlib.util

    vllm_engine = importlib.util.find_spec("swift.infer_engine.vllm_engine")
    text = Path(vllm_engine.origin).read_text(encoding="utf-8")
    init = text[text.index("class VllmEngine") :]
    init = init[init.index("def __init__") : init.index(") -> None:")]
    assert all(f"{name}:" in init for name in passed)


def test_template_prompt_settings_configure_template_sets():
    from swift.template import Template, TemplateMeta

    init = source(Template.__init__)
    assert "self.max_pixels = max_pixels" in init
    assert "template_meta.check_system(default_system)" in init
    assert "template_meta.default_system = default_system" in init
    assert "self.max_pixels" in source(Template._get_max_pixels)
    assert callable(TemplateMeta.check_system)


def test_ms_swift_refuses_its_own_seq_kd_and_its_gkd_trainer_never_reads_it():
    """anchorkd implements seq_kd on the data side and keeps ms-swift's flag False; if ms-swift brings the
    flag back to life in its trainer, this fails so the two cannot both generate."""
    _, rlhf_cls = seam.arguments_classes()
    assert "seq_kd" in seam.field_names(rlhf_cls)
    assert "raise NotImplementedError" in source(rlhf_cls._check_gkd)
    gkd = seam.gkd_trainer_base()
    assert "seq_kd" not in inspect.getsource(inspect.getmodule(gkd))
    assert "HFSFTTrainer.training_step" in source(gkd.training_step)  # not TRL's, which reads args.seq_kd


def test_engine_settings_without_a_gpu_rest_on_these_internals():
    """``cpu_mixed_precision`` / ``start_cpu_deepspeed_state``: ms-swift turns fp16 on for float32 models when
    unset; transformers builds DeepSpeed's state without a backend unless told to use a configured one;
    accelerate starts DeepSpeed's comm only under a launcher; ms-swift fills in a single process's launcher
    variables."""
    from accelerate.state import PartialState
    from swift.arguments.base_args.model_args import ModelArguments
    from swift.utils import set_default_ddp_config
    from transformers import TrainingArguments

    mixed = source(ModelArguments._init_mixed_precision)
    assert "torch.float32" in mixed and "if self.fp16 is None" in mixed
    setup = source(TrainingArguments._setup_devices.func)
    assert '"use_configured_state"' in setup and 'accelerator_state_kwargs["use_deepspeed"] = True' in setup
    state = source(PartialState.__init__)
    assert 'os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")' in state and "LOCAL_RANK" in state
    launcher = source(set_default_ddp_config)
    assert all(
        f"os.environ['{name}']" in launcher for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")
    )
    assert seam.cpu_mixed_precision({}) == {"fp16": False}
    assert seam.cpu_mixed_precision({"fp16": True}) == {}
