"""Resume without training: checkpoint completeness, the ``auto`` pick, the run folder a resume continues,
log trimming, the GKD sampler's epoch order and the alert state carried over a restart."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from anchorkd import swift_seam as seam
from anchorkd.checkpoints import (
    ResumePlan,
    is_complete_checkpoint,
    list_checkpoints,
    missing_checkpoint_parts,
    newest_complete_checkpoint,
    plan_resume,
    resolve_resume_checkpoint,
    resume_plan,
    with_resume,
)
from anchorkd.config import CustomConfig, ResolvedConfig
from anchorkd.errors import ConfigError, DataError
from anchorkd.monitor.alerts import AlertConfig, AlertMonitor
from anchorkd.monitor.callback import AlertCallback
from anchorkd.trainers.resume import (
    EpochSeededSampler,
    generation_buffer_position,
    prepare_run_dir,
    trim_log_after,
)

KEY = "training.resume_from_checkpoint"
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth")


def make_checkpoint(run_dir: Path, step: int, *, drop=(), state_step: int | None = None) -> Path:
    """A checkpoint folder as HF writes it for a LoRA run (files hold placeholder bytes)."""
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", *TRAINING_STATE):
        if name not in drop:
            (folder / name).write_bytes(b"x" * 16)
    if "trainer_state.json" not in drop:
        state = {"global_step": step if state_step is None else state_step, "log_history": []}
        (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def link_last(run_dir: Path, checkpoint: Path) -> None:
    os.symlink(checkpoint.name, run_dir / "last-checkpoint")


# --- completeness ------------------------------------------------------------------------------------


def test_a_checkpoint_with_every_part_is_complete(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 3)
    assert missing_checkpoint_parts(checkpoint) == []
    assert is_complete_checkpoint(checkpoint)


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        (("trainer_state.json",), "trainer_state.json (HF writes it last"),
        (("adapter_model.safetensors",), "the model weights"),
        (("optimizer.pt",), "the optimizer state"),
        (("scheduler.pt",), "scheduler.pt"),
        (("rng_state.pth",), "the RNG state"),
    ],
)
def test_each_missing_part_is_named(tmp_path, drop, named):
    missing = missing_checkpoint_parts(make_checkpoint(tmp_path, 3, drop=drop))
    assert len(missing) == 1 and missing[0].startswith(named), missing


def test_a_trainer_state_cut_short_or_of_another_step_is_incomplete(tmp_path):
    cut = make_checkpoint(tmp_path, 3)
    (cut / "trainer_state.json").write_text('{"global_step": 3, "log_hi')
    assert missing_checkpoint_parts(cut)[0].startswith("trainer_state.json (HF writes it last")
    other = make_checkpoint(tmp_path, 6, state_step=5)
    assert missing_checkpoint_parts(other) == ["trainer_state.json of step 6 (it records step 5)"]


def test_an_empty_weights_file_is_not_weights(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 3)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    assert missing_checkpoint_parts(checkpoint)[0].startswith("the model weights")


def test_sharded_weights_need_every_shard(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 3, drop=("adapter_model.safetensors",))
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    (checkpoint / shards["a"]).write_bytes(b"x")
    assert missing_checkpoint_parts(checkpoint)[0].startswith("the model weights")
    (checkpoint / shards["b"]).write_bytes(b"x")
    assert missing_checkpoint_parts(checkpoint) == []


def test_per_rank_rng_states_must_have_no_gap(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 3, drop=("rng_state.pth",))
    (checkpoint / "rng_state_0.pth").write_bytes(b"x")
    (checkpoint / "rng_state_2.pth").write_bytes(b"x")
    assert missing_checkpoint_parts(checkpoint) == ["rng_state_1.pth"]
    (checkpoint / "rng_state_1.pth").write_bytes(b"x")
    assert missing_checkpoint_parts(checkpoint) == []


def test_resuming_only_the_model_needs_weights_and_trainer_state(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 3, drop=TRAINING_STATE)
    assert len(missing_checkpoint_parts(checkpoint)) == 3
    assert missing_checkpoint_parts(checkpoint, model_only=True) == []


def test_a_save_newer_than_swifts_last_checkpoint_link_did_not_finish(tmp_path):
    older = make_checkpoint(tmp_path, 3)
    newer = make_checkpoint(tmp_path, 6)  # every file there, but another rank never finished
    link_last(tmp_path, older)
    (missing,) = missing_checkpoint_parts(newer)
    assert "last-checkpoint points at checkpoint-3" in missing
    assert missing_checkpoint_parts(older) == []
    os.remove(tmp_path / "last-checkpoint")
    link_last(tmp_path, tmp_path / "checkpoint-9")  # dangling: rotated away, says nothing
    assert missing_checkpoint_parts(newer) == []


# --- the auto pick -----------------------------------------------------------------------------------


def test_auto_picks_the_newest_complete_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 3)
    make_checkpoint(tmp_path, 6)
    make_checkpoint(tmp_path, 9, drop=("trainer_state.json",))  # a kill during the save
    make_checkpoint(tmp_path, 12, drop=("trainer_state.json", "rng_state.pth", "scheduler.pt"))
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in (3, 6, 9, 12)]
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert resolve_resume_checkpoint("auto", tmp_path) == (tmp_path / "checkpoint-6").resolve()


def test_auto_looks_in_the_newest_version_folder_that_has_a_complete_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "v0-20260101-000000", 20)
    make_checkpoint(tmp_path / "v1-20260102-000000", 4)
    make_checkpoint(tmp_path / "v2-20260103-000000", 8, drop=("trainer_state.json",))
    (tmp_path / "v10-20260104-000000").mkdir()  # a fresh run killed before its first save
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "v1-20260102-000000" / "checkpoint-4"


def test_auto_without_a_complete_checkpoint_is_a_fresh_run(tmp_path):
    assert resolve_resume_checkpoint("auto", tmp_path / "not-yet") is None
    make_checkpoint(tmp_path, 3, drop=("trainer_state.json",))
    assert resolve_resume_checkpoint("AUTO", tmp_path) is None


@pytest.mark.parametrize("value", [None, "", "  "])
def test_no_resume(value, tmp_path):
    assert resolve_resume_checkpoint(value, tmp_path) is None


def test_auto_needs_an_output_dir():
    with pytest.raises(ConfigError) as error:
        resolve_resume_checkpoint("auto", None)
    assert error.value.key_path == KEY and "training.output_dir" in str(error.value)


def test_a_missing_checkpoint_is_a_config_error(tmp_path):
    make_checkpoint(tmp_path, 3)
    with pytest.raises(ConfigError) as error:
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-5"), tmp_path)
    assert error.value.key_path == KEY
    assert "checkpoint not found" in str(error.value)
    assert str(tmp_path / "checkpoint-3") in str(error.value)  # the one to use instead


def test_an_incomplete_checkpoint_is_a_config_error_naming_what_is_missing(tmp_path):
    make_checkpoint(tmp_path, 3)
    half = make_checkpoint(tmp_path, 6, drop=("trainer_state.json", "rng_state.pth"))
    with pytest.raises(ConfigError) as error:
        resolve_resume_checkpoint(str(half), tmp_path)
    message = str(error.value)
    assert error.value.key_path == KEY and "is not a complete checkpoint" in message
    assert "trainer_state.json" in message and "RNG state" in message
    assert f"newest complete checkpoint there is {tmp_path / 'checkpoint-3'}" in message


# --- the run a resume continues ---------------------------------------------------------------------


def resolved_config(training: dict) -> ResolvedConfig:
    return ResolvedConfig({"training": training, "model": {}}, CustomConfig(), 1.0, "sft", (Path("x.yaml"),))


def test_a_resume_continues_in_the_checkpoints_run_folder(tmp_path):
    run = tmp_path / "out" / "v0-20260101-000000"
    make_checkpoint(run, 3)
    training = {"output_dir": str(tmp_path / "out"), "resume_from_checkpoint": "auto", "add_version": True}
    config = with_resume(resolved_config(training))
    assert config.sections["training"] == {
        "output_dir": str(run.resolve()),
        "resume_from_checkpoint": str((run / "checkpoint-3").resolve()),
        "add_version": False,
    }
    assert training["resume_from_checkpoint"] == "auto"  # the resolved config is not changed in place
    assert resume_plan(config) == ResumePlan((run / "checkpoint-3").resolve(), 3)
    assert with_resume(config) == config  # idempotent


def test_auto_with_nothing_to_resume_drops_the_key(tmp_path):
    config = with_resume(resolved_config({"output_dir": str(tmp_path), "resume_from_checkpoint": "auto"}))
    assert config.sections["training"] == {"output_dir": str(tmp_path)}
    assert resume_plan(config) is None
    plain = resolved_config({"output_dir": str(tmp_path)})
    assert with_resume(plain) is plain


def test_weights_only_without_data_skip_is_a_new_run(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "old", 3, drop=TRAINING_STATE)
    plan = plan_resume(str(checkpoint), tmp_path / "new", resume_only_model=True, ignore_data_skip=True)
    assert plan.step == 3 and not plan.continues_run
    assert plan.swift_overrides() == {"resume_from_checkpoint": str(checkpoint.resolve())}


# --- trimming the logs -------------------------------------------------------------------------------


def swift_record(step: int, max_steps: int = 6, **values) -> str:
    return json.dumps({"loss": 1.0 / step, **values, "global_step/max_steps": f"{step}/{max_steps}"}) + "\n"


def test_trim_keeps_records_up_to_the_step_byte_for_byte(tmp_path):
    log = tmp_path / "logging.jsonl"
    kept = [swift_record(s) for s in (1, 2, 3)] + [
        json.dumps({"eval_loss": 2.0, "global_step/max_steps": "3/6"}) + "\n"
    ]
    later = [swift_record(s) for s in (4, 5)]
    summaries = [
        json.dumps({"train_runtime": 9.0, "train_loss": 1.1, "global_step/max_steps": "3/6"}) + "\n",
        json.dumps({"last_model_checkpoint": "x/checkpoint-3", "global_step": 3, "log_history": []}) + "\n",
    ]
    torn = '{"loss": 0.2, "global_st'  # the write a kill interrupted
    log.write_text("".join(kept[:2] + summaries + kept[2:] + later) + "\n" + torn)
    assert trim_log_after(log, 3) == (4, 5)
    assert log.read_text() == "".join(kept)
    assert trim_log_after(log, 3) == (4, 0)  # idempotent


def test_trim_alert_records_by_their_step(tmp_path):
    alerts = tmp_path / "alerts.jsonl"
    lines = [
        json.dumps({"step": s, "rule": "nonfinite", "metric": "loss", "value": "NaN"}) + "\n" for s in (2, 4)
    ]
    alerts.write_text("".join(lines))
    assert trim_log_after(alerts, 3) == (1, 1)
    assert alerts.read_text() == lines[0]


def test_trim_refuses_a_bad_line_before_the_last_and_changes_nothing(tmp_path):
    log = tmp_path / "logging.jsonl"
    text = swift_record(1) + "not json\n" + swift_record(4)
    log.write_text(text)
    with pytest.raises(DataError, match=r"logging.jsonl:2: not a JSON record"):
        trim_log_after(log, 3)
    assert log.read_text() == text


def test_trim_of_a_missing_log_does_nothing(tmp_path):
    assert trim_log_after(tmp_path / "alerts.jsonl", 3) == (0, 0)
    assert not (tmp_path / "alerts.jsonl").exists()


def test_prepare_run_dir_moves_later_checkpoints_aside_and_repoints_the_link(tmp_path):
    resumed = make_checkpoint(tmp_path, 3)
    make_checkpoint(tmp_path, 6)
    make_checkpoint(tmp_path, 9, drop=("trainer_state.json",))
    link_last(tmp_path, tmp_path / "checkpoint-6")
    (tmp_path / "logging.jsonl").write_text("".join(swift_record(s) for s in range(1, 8)))
    (tmp_path / "alerts.jsonl").write_text(json.dumps({"step": 7}) + "\n")

    result = prepare_run_dir(plan_resume(str(resumed), tmp_path))

    assert result.dropped_records == {"logging.jsonl": 4, "alerts.jsonl": 1}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert result.superseded == [
        tmp_path / "superseded" / "checkpoint-6",
        tmp_path / "superseded" / "checkpoint-9",
    ]
    assert (tmp_path / "superseded" / "checkpoint-6" / "trainer_state.json").is_file()
    assert os.readlink(tmp_path / "last-checkpoint") == "checkpoint-3"
    assert (tmp_path / "alerts.jsonl").read_text() == ""
    again = prepare_run_dir(plan_resume(str(resumed), tmp_path))
    assert (again.dropped_records, again.superseded) == ({}, [])


def test_a_second_rewind_keeps_both_superseded_copies(tmp_path):
    resumed = make_checkpoint(tmp_path, 3)
    make_checkpoint(tmp_path, 6)
    prepare_run_dir(plan_resume(str(resumed), tmp_path))
    make_checkpoint(tmp_path, 6)
    result = prepare_run_dir(plan_resume(str(resumed), tmp_path))
    assert result.superseded == [tmp_path / "superseded" / "checkpoint-6.2"]


# --- the GKD sampler ---------------------------------------------------------------------------------


def repeat_sampler(seed: int = 0):
    from trl.trainer.utils import RepeatSampler

    return RepeatSampler(list(range(12)), mini_repeat_count=1, batch_size=4, repeat_count=2, seed=seed)


def test_a_restarted_repeat_sampler_replays_the_first_epoch():
    """The bug: a fresh process's sampler gives epoch 1 the order of epoch 0."""
    straight = repeat_sampler()
    epoch_0, epoch_1 = list(straight), list(straight)
    assert epoch_0 != epoch_1
    assert list(repeat_sampler()) == epoch_0


def test_epoch_seeded_sampler_gives_each_epoch_its_straight_run_order():
    straight = EpochSeededSampler(repeat_sampler())
    passes = []
    for epoch in range(3):
        straight.set_epoch(epoch)
        passes.append(list(straight))
    stock = repeat_sampler()
    assert passes == [list(stock) for _ in range(3)]  # a straight run's order is unchanged
    for epoch in (2, 1):
        restarted = EpochSeededSampler(repeat_sampler())
        restarted.set_epoch(epoch)
        restarted.set_epoch(epoch)  # HF and the callback may both set it
        assert list(restarted) == passes[epoch]
    assert len(straight) == len(stock) == 24


def test_epoch_seeded_sampler_keeps_the_generator_accelerate_synchronises():
    inner = repeat_sampler()
    wrapped = EpochSeededSampler(inner)
    generator = wrapped.generator
    wrapped.set_epoch(1)
    assert wrapped.generator is generator is inner.generator


@pytest.mark.parametrize(
    ("step", "accumulation", "per_generation", "expected"),
    [(3, 1, 1, (3, True)), (3, 2, 2, (6, True)), (3, 1, 2, (3, False)), (4, 1, 2, (4, True))],
)
def test_generation_buffer_position(step, accumulation, per_generation, expected):
    assert generation_buffer_position(step, accumulation, per_generation) == expected


# --- the alert state over a restart -------------------------------------------------------------------


class _State:
    def __init__(self, log_history, global_step=0):
        self.log_history = log_history
        self.global_step = global_step
        self.is_world_process_zero = True


def test_alert_state_continues_from_the_checkpoints_log_history(tmp_path):
    config = AlertConfig(kd_spike_min_history=3, kd_spike_window=5, kd_spike_min_threshold=0.0)
    values = [1.0, 1.2, 0.9, 1.1, 2.5, 1.0, 4.0]  # step 7 is a spike only against the earlier median
    straight = AlertMonitor(config)
    expected = [a for s, v in enumerate(values, 1) for a in straight.update(s, {"llm_kd_loss": v})]
    assert [a.step for a in expected] == [7]

    callback = AlertCallback(config, tmp_path)
    history = [{"llm_kd_loss": v, "epoch": s / 7, "step": s} for s, v in enumerate(values[:5], 1)]
    callback.on_train_begin(None, _State(history, 5), None)
    for step, value in ((6, values[5]), (7, values[6])):
        callback.on_log(None, _State(history, step), None, logs={"llm_kd_loss": value})
    written = [json.loads(line) for line in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert written == [alert.to_dict() for alert in expected]

    fresh = AlertCallback(config, tmp_path / "fresh")
    fresh.on_train_begin(None, _State([], 5), None)
    for step, value in ((6, values[5]), (7, values[6])):
        fresh.on_log(None, _State([], step), None, logs={"llm_kd_loss": value})
    assert not (tmp_path / "fresh" / "alerts.jsonl").exists()  # too little history without the replay


# --- what the rules above rely on in the pinned stack -----------------------------------------------------


def test_transformers_writes_trainer_state_after_weights_optimizer_and_rng_state():
    import inspect

    from swift.trainers.mixin import SwiftMixin
    from swift.utils import LAST_CHECKPOINT_SYMLINK
    from transformers import trainer as hf

    assert (hf.TRAINER_STATE_NAME, hf.OPTIMIZER_NAME, hf.SCHEDULER_NAME) == (
        "trainer_state.json",
        "optimizer.pt",
        "scheduler.pt",
    )
    save = inspect.getsource(hf.Trainer._save_checkpoint)
    calls = ("self.save_model(", "self._save_optimizer_and_scheduler(", "self._save_rng_state(")
    order = [save.index(call) for call in (*calls, "TRAINER_STATE_NAME))", "rotate_checkpoints(")]
    assert order == sorted(order)
    rng = inspect.getsource(hf.Trainer._save_rng_state)
    assert '"rng_state.pth"' in rng and 'f"rng_state_{self.args.process_index}.pth"' in rng
    # ms-swift moves its link after the whole save, once every rank is past a barrier.
    assert seam.LAST_CHECKPOINT_LINK == LAST_CHECKPOINT_SYMLINK
    swift_save = inspect.getsource(SwiftMixin._save_checkpoint)
    assert swift_save.index("super()._save_checkpoint(") < swift_save.index(
        "self._update_last_checkpoint_symlink()"
    )
    assert "dist.barrier()" in inspect.getsource(SwiftMixin._update_last_checkpoint_symlink)


def test_swifts_gkd_trainer_samples_through_get_train_sampler_with_a_repeat_sampler():
    import inspect

    from trl.trainer.utils import RepeatSampler

    gkd = seam.gkd_trainer_base()
    assert "sampler_fn=self._get_train_sampler" in inspect.getsource(gkd.get_train_dataloader)
    assert "RepeatSampler(" in inspect.getsource(gkd._get_train_sampler)
    sampler = repeat_sampler(seed=5)
    assert seam.sampler_shuffle_seed(sampler) == 5 and seam.sampler_generator(sampler) is sampler.generator
    assert seam.sampler_shuffle_seed(RepeatSampler(list(range(4)), 1, batch_size=2, shuffle=False)) is None


def test_restart_generation_buffer_sets_swifts_counter_and_drops_the_buffer():
    trainer = type("Trainer", (), {"_step": 0, "_buffered_inputs": [{"x": 1}]})()
    seam.restart_generation_buffer(trainer, 6)
    assert (trainer._step, trainer._buffered_inputs) == (6, None)
