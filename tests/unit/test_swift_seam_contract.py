"""The contract of ``anchorkd.swift_seam`` and ``anchorkd.deepspeed_seam``: every ms-swift / transformers /
PEFT / DeepSpeed internal they touch exists with the shape they rely on, and every private hook anchorkd's
subclasses override is listed with its parameters. An upgrade of the pinned stack that moves one of them
fails here, by name."""

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


def test_torchrun_args_need_nproc_per_node(monkeypatch):
    for name in ("NPROC_PER_NODE", "NNODES"):
        monkeypatch.delenv(name, raising=False)
    assert seam.torchrun_args() is None
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    args = seam.torchrun_args()
    assert args is not None and "--nproc_per_node" in args and "2" in args


def test_model_registry_maps_model_types_to_architectures():
    """``checkpoint_rules`` reads ms-swift's MODEL_MAPPING: each ModelMeta's ``architectures`` (what ms-swift
    matches config.json's ``architectures[0]`` against) and ``is_multimodal`` (what all-linear depends on)."""
    from swift.model import MODEL_MAPPING
    from swift.model.model_meta import ModelMeta, _get_model_info, get_matched_model_types

    assert isinstance(MODEL_MAPPING["qwen3_vl"], ModelMeta)
    assert "get_matched_model_types(architectures)" in source(_get_model_info)
    registry = seam.registered_model_types()
    qwen3_vl = "Qwen3VLForConditionalGeneration"
    assert registry["qwen3_vl"] == seam.RegisteredModelType("qwen3_vl", (qwen3_vl,), True)
    assert registry["qwen3"].architectures == ("Qwen3ForCausalLM",) and not registry["qwen3"].multimodal
    fitting = {name for name, entry in registry.items() if qwen3_vl in entry.architectures}
    assert fitting == set(get_matched_model_types([qwen3_vl]))


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


# --- the private hooks anchorkd's subclasses override ------------------------------------------------------

# Each hook anchorkd overrides, with the parameters ms-swift / transformers call it with and anchorkd's override
# takes. A new override of a foreign private method must be added here (the next test fails until it is).
OVERRIDDEN_HOOKS: dict[str, tuple[str, ...]] = {
    "_prepare_inputs": ("self", "inputs"),  # GKDTrainer: builds or reads the generation buffer
    "_rollout_samples": ("self", "inputs"),  # GKDTrainer: rows -> GKDSamples (+ student samples)
    "split_by_mini_batches": ("self", "samples"),  # RolloutMixin: samples -> micro-batches
    "_prepare_batch_inputs": ("self", "samples"),  # GKDTrainer: micro-batches -> encoded batch dicts
    "_get_train_sampler": ("self", "train_dataset"),  # GKDTrainer (RepeatSampler), HF Trainer
    "_get_trainer_kwargs": ("self",),  # SwiftSft / SwiftRLHF: the trainer's constructor arguments
}


def parameters(function) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


def anchorkd_subclasses() -> list[type]:
    from anchorkd.trainers.gkd_monitor import GKDTrainerWithMetrics
    from anchorkd.trainers.pipeline import _pipeline_classes
    from anchorkd.trainers.resume import ResumableGKDTrainer

    return [GKDTrainerWithMetrics, ResumableGKDTrainer, *_pipeline_classes()]


def foreign_bases(cls: type) -> list[type]:
    return [base for base in cls.__mro__ if not base.__module__.startswith("anchorkd")]


def test_the_hooks_anchorkd_overrides_have_the_parameters_it_relies_on():
    gkd = seam.gkd_trainer_base()
    swift_sft, swift_rlhf = seam.pipeline_classes()
    owners = {name: [gkd] for name in OVERRIDDEN_HOOKS}
    owners["_get_trainer_kwargs"] = [swift_sft, swift_rlhf]
    for name, expected in OVERRIDDEN_HOOKS.items():
        for owner in owners[name]:
            assert parameters(getattr(owner, name)) == expected, f"{owner.__name__}.{name}"
    from transformers import Trainer

    assert parameters(Trainer._get_train_sampler) == OVERRIDDEN_HOOKS["_get_train_sampler"]


def test_anchorkd_overrides_only_the_listed_hooks_and_with_their_parameters():
    overridden = set()
    for cls in anchorkd_subclasses():
        own = [c for c in cls.__mro__ if c.__module__.startswith("anchorkd")]  # the class and its mixins
        for name, member in ((n, m) for c in own for n, m in c.__dict__.items()):
            if not callable(member) or name.startswith("__"):
                continue
            foreign = [base for base in foreign_bases(cls) if name in base.__dict__]
            if not foreign or not (name.startswith("_") or name in OVERRIDDEN_HOOKS):
                continue  # anchorkd's own method, or a public one of the foreign class
            assert name in OVERRIDDEN_HOOKS, (
                f"{cls.__name__}.{name} overrides {foreign[0].__name__}'s: list it"
            )
            assert parameters(member) == OVERRIDDEN_HOOKS[name], f"{cls.__name__}.{name}"
            overridden.add(name)
    assert overridden == set(OVERRIDDEN_HOOKS)  # the list holds no hook anchorkd stopped overriding


# --- transformers' accumulation knob -----------------------------------------------------------------------


def test_hf_divides_by_accumulation_unless_the_trainer_says_its_loss_is_scaled():
    from transformers import Trainer

    assert Trainer.loss_is_scaled_for_ga is None  # a class attribute: HF decides unless told
    step = source(Trainer.training_step)
    assert "if self.loss_is_scaled_for_ga is not None:" in step
    assert "loss = loss / self.current_gradient_accumulation_steps" in step
    trainer = type("Trainer", (), {})()
    seam.mark_loss_scaled_for_accumulation(trainer)
    assert trainer.loss_is_scaled_for_ga is True


# --- templates (text perplexity, evaluation provenance) ---------------------------------------------------


def test_template_internals_text_perplexity_and_describe_use():
    from swift.template import Template, TemplateMeta

    assert parameters(Template.data_collator) == ("self", "batch", "padding_to")
    assert parameters(Template.pre_forward_hook) == ("self", "model", "args", "kwargs")
    assert "return args, kwargs" in source(Template.pre_forward_hook)
    assert Template.use_model is False  # a class default; multimodal templates keep it
    assert "self.mode = mode" in source(Template.set_mode)
    assert "template_type" in seam.field_names(TemplateMeta)


class StubTemplate:
    use_model = True
    model = None

    def __init__(self) -> None:
        self.mode = "transformers"

    def set_mode(self, mode: str) -> None:
        self.mode = mode


def test_training_encoding_restores_the_engines_mode_even_when_the_block_fails():
    template, model = StubTemplate(), object()
    with pytest.raises(RuntimeError), seam.training_encoding(template, model) as inside:
        assert inside is template and template.mode == "train" and template.model is model
        raise RuntimeError("a record that does not encode")
    assert template.mode == "transformers"
    template = StubTemplate()
    template.use_model = False
    with seam.training_encoding(template, model):
        assert template.model is None


# --- PEFT ------------------------------------------------------------------------------------------------


def test_peft_base_layer_is_the_linear_a_lora_layer_wraps():
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 6)

    model = Head()
    original = model.lm_head
    assert seam.peft_base_layer(original) is original  # no wrapper: the layer itself
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["lm_head"]), model)
    assert model.lm_head is not original and seam.peft_base_layer(model.lm_head) is original


# --- DeepSpeed ZeRO-3 (anchorkd.deepspeed_seam) -----------------------------------------------------------

ZERO3_PROBE = """
import json, os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
import torch, deepspeed
import deepspeed.comm.torch
from anchorkd import deepspeed_seam as zero3

# DeepSpeed's CPU shared-memory op: minutes of compiling on a fresh machine, and unused by one process.
# (By sys.modules: the package attribute ``deepspeed.comm.torch`` is the torch module itself.)
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
deepspeed.init_distributed(dist_backend="gloo")
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
    layer = torch.nn.Linear(4, 3)
p = layer.weight
seen = {"zero3": zero3.is_zero3_param(p), "plain": zero3.is_zero3_param(torch.nn.Parameter(torch.ones(2))),
        "partitioned": [zero3.is_gathered(p), p.numel(), zero3.held_by_a_module(p)]}
zero3.gather(p)
seen["gathered"] = [zero3.is_gathered(p), list(p.shape)]
zero3.release(p)
seen["released"] = [zero3.is_gathered(p), p.numel()]
with zero3.gathered_for_reading([p]):
    seen["reading"] = [zero3.is_gathered(p), list(p.shape)]
seen["after_reading"] = zero3.is_gathered(p)
p.ds_active_sub_modules.add(7)  # what ZeRO-3's coordinator does while a module uses the parameter
seen["held"] = zero3.held_by_a_module(p)
print("ZERO3 " + json.dumps(seen))
"""


def test_zero3_parameter_internals_behave_as_the_deepspeed_seam_uses_them(tmp_path):
    """A real ZeRO-3 parameter (one process, gloo) through every function of ``deepspeed_seam``."""
    pytest.importorskip("deepspeed")
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "zero3_probe.py"
    script.write_text(ZERO3_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=600, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("ZERO3 ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    seen = json.loads(lines[-1].removeprefix("ZERO3 "))
    assert seen == {
        "zero3": True,
        "plain": False,
        "partitioned": [False, 0, False],
        "gathered": [True, [3, 4]],
        "released": [False, 0],
        "reading": [True, [3, 4]],
        "after_reading": False,
        "held": True,
    }


def test_zero3_releases_a_parameter_only_when_no_module_holds_it():
    """``sharding`` re-partitions a parameter it gathered itself only when ``ds_active_sub_modules`` is empty:
    ZeRO-3's coordinator adds a module while it uses the parameter and releases the parameter with it."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero import partition_parameters, partitioned_param_coordinator
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    assert {"AVAILABLE", "NOT_AVAILABLE", "INFLIGHT"} <= {status.name for status in ZeroParamStatus}
    convert = source(partition_parameters.Init._convert_to_deepspeed_param)
    assert "param.ds_active_sub_modules = set()" in convert
    assert "def partition(param_list=None, hierarchy=0, has_been_updated=False" in convert
    assert "param.partition = partition" in convert and "param.all_gather = all_gather" in convert
    coordinator = source(partitioned_param_coordinator)
    assert "param.ds_active_sub_modules.add(" in coordinator
    assert "param.ds_active_sub_modules.discard(" in coordinator


def test_gkd_sample_encoding_the_teacher_cache_uses():
    """``encode_micro_batch`` (the teacher cache's rows, encoded as training encodes them) calls
    ``GKDTrainer._encode_samples(samples)``, which returns ``(student inputs, OPSD teacher inputs or None)``
    and is what ``_prepare_batch_inputs`` encodes every micro-batch with."""
    gkd = seam.gkd_trainer_base()
    assert list(inspect.signature(gkd._encode_samples).parameters) == ["self", "samples"]
    assert "self._encode_samples(chunk_samples)" in source(gkd._prepare_batch_inputs)
    assert "teacher_encoded = None" in source(gkd._encode_samples)
