"""Spec 004 acceptance tests: feature-level visual KD on Qwen3-VL's vision merger and deepstack mergers.

The trainer is ``configs/stage_3_gkd.yaml`` on the tiny model (aligner trainable, so the loader loads a
separate frozen teacher) with ``custom.visual_kd`` on (weight 0.7). The student's LoRA, which ms-swift also
puts on the aligner's linears, is perturbed so the term is non-zero. Expected values come from forward
hooks of our own on the student's and the teacher's mergers, never from the trainer's capture.
"""

from __future__ import annotations

import gkd_harness as h
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.integration_utils import rewrite_logs

from anchorkd.config import ConfigError, ConfigLoader
from anchorkd.losses.visual import feature_distance, visual_kd_loss
from anchorkd.trainers.features import visual_targets
from anchorkd.trainers.gkd_monitor import visual_tokens

pytestmark = pytest.mark.integration

REL = 1e-5
TARGETS = ["deepstack.0", "deepstack.1", "merger"]


@pytest.fixture(scope="module")
def env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    return h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def visual(env):
    return h.visual_build(env).trainer


def approx(expected, rel=REL, abs_=0.0):
    return pytest.approx(expected, rel=rel, abs=abs_)


def oracle_visual(student: dict, teacher: dict, distance: str = "mse") -> torch.Tensor:
    """Mean over targets of the per-token distance, written out here (not anchorkd's function)."""
    terms = []
    for name in TARGETS:
        s, t = student[name].float(), teacher[name].float()
        if distance == "mse":
            terms.append(((s - t) ** 2).mean(dim=-1).mean())
        else:
            terms.append((1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean())
    return torch.stack(terms).mean()


class Hooks:
    """Our recorders on both models, removed on exit."""

    def __init__(self, trainer) -> None:
        self.student = h.Recorder(h.merger_modules(h.unwrap(trainer)))
        self.teacher = h.Recorder(h.merger_modules(trainer.teacher_model))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.student.remove()
        self.teacher.remove()

    def first(self, side: str) -> dict:
        recorder = getattr(self, side)
        return {name: outputs[0] for name, outputs in recorder.outputs.items()}


@pytest.mark.parametrize("llm_kd_weight", [0.0, 0.5])
def test_hooks_reuse_merger_and_deepstack_outputs_of_the_normal_forwards(visual, monkeypatch, llm_kd_weight):
    """Hooks fire on the student's and the teacher's visual.merger and every deepstack merger during the
    normal forwards: each merger runs exactly once per model per compute_loss, and the student features
    the loss uses are the very tensors the student's forward produced (no extra vision compute)."""
    trainer = visual
    seen = {}
    original = trainer._visual_term

    def spy(student_features, teacher_features, *args):
        seen["student"], seen["teacher"] = dict(student_features), dict(teacher_features)
        return original(student_features, teacher_features, *args)

    monkeypatch.setattr(trainer, "_visual_term", spy)
    with h.configured(trainer, llm_kd_weight=llm_kd_weight), Hooks(trainer) as hooks:
        batch = h.prepare(trainer, h.dataset_rows(trainer, [0]))
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)

    assert sorted(hooks.student.outputs) == TARGETS and sorted(hooks.teacher.outputs) == TARGETS
    for name in TARGETS:
        assert hooks.student.calls(name) == 1, name
        assert hooks.teacher.calls(name) == 1, name
        assert seen["student"][name] is hooks.student.outputs[name][0]
        assert torch.equal(seen["teacher"][name], hooks.teacher.outputs[name][0])
    visual_names = {name for name in seen["student"] if name != "body"}
    assert visual_names == set(TARGETS) == {name for name in seen["teacher"] if name != "body"}
    # merged visual tokens: rows of every captured feature matrix, as counted from image_grid_thw
    merge = trainer._spatial_merge_size()
    n_tokens = visual_tokens(batch["model_inputs"], merge)
    assert n_tokens == 16
    assert all(hooks.student.outputs[name][0].shape[0] == n_tokens for name in TARGETS)


def test_visual_kd_gradients_reach_student_aligner_teacher_stays_frozen(visual):
    """Separate-teacher mode (stage 3): the teacher's features carry no autograd history and its
    parameters never get a gradient; the visual term's gradient reaches the student's aligner (merger and
    deepstack mergers) and nothing else; the loss's gradient equals that of ce + 0.7 * visual."""
    trainer = visual
    assert trainer.teacher_mode == "separate"
    student = h.unwrap(trainer)
    # ms-swift trains the aligner of a LoRA run through LoRA adapters on the mergers' linears
    aligner = [p for m in h.merger_modules(student).values() for p in m.parameters() if p.requires_grad]
    language_lora = [p for n, p in student.named_parameters() if "lora_" in n and ".visual." not in n]
    assert aligner and language_lora and all(p.requires_grad for p in language_lora)
    lora = language_lora

    with h.configured(trainer, llm_kd_weight=0.0, kd_loss_impl="reference"), Hooks(trainer) as hooks:
        batch = h.prepare(trainer, h.dataset_rows(trainer, [0]))
        loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        student_feats, teacher_feats = hooks.first("student"), hooks.first("teacher")
        assert all(f.requires_grad for f in student_feats.values())
        assert not any(f.requires_grad for f in teacher_feats.values())

        targets = batch["model_inputs"]["labels"][:, 1:]
        mask = targets != -100
        ce = F.cross_entropy(outputs.logits[:, :-1][mask].float(), targets[mask])
        vis = oracle_visual(student_feats, teacher_feats)
        assert float(vis) > 1e-4
        assert float(loss) == approx(float(ce + h.VISUAL_WEIGHT * vis))

        grad_loss = torch.autograd.grad(loss, aligner, retain_graph=True)
        grad_expected = torch.autograd.grad(ce + h.VISUAL_WEIGHT * vis, aligner, retain_graph=True)
        for got, want in zip(grad_loss, grad_expected, strict=True):
            assert float((got - want).norm()) <= 1e-4 * float(want.norm()) + 1e-12
        grad_vis = torch.autograd.grad(vis, aligner + lora, retain_graph=True, allow_unused=True)
        assert sum(float(g.norm()) for g in grad_vis[: len(aligner)] if g is not None) > 0
        assert all(g is None or float(g.abs().max()) == 0.0 for g in grad_vis[len(aligner) :])

        loss.backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in aligner)
        teacher_params = list(trainer.teacher_model.parameters())
        assert teacher_params and all(p.grad is None and not p.requires_grad for p in teacher_params)


def test_cosine_distance_with_lm_kd(visual):
    """distance: cosine, together with LM-head KD (w = 0.5): loss = 0.5 jsd + 0.3 ce + 0.7 (1 - cos)."""
    trainer = visual
    cosine = trainer.visual_kd.model_copy(update={"distance": "cosine"})
    with h.configured(trainer, visual_kd=cosine, kd_loss_impl="fused"), Hooks(trainer) as hooks:
        batch = h.prepare(trainer, h.dataset_rows(trainer, [0]))
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        vis = float(oracle_visual(hooks.first("student"), hooks.first("teacher"), "cosine"))
        terms = h.batch_terms(trainer, batch)
        assert vis > 1e-5 and terms.jsd > 1e-3
        assert float(loss) == approx(0.5 * terms.jsd + 0.3 * terms.ce + h.VISUAL_WEIGHT * vis)
        assert trainer._metrics["train"]["vision_kd_loss"] == [approx(h.VISUAL_WEIGHT * vis)]


def test_distance_normalised_per_token():
    """Doubling the image count (every feature row twice) keeps the per-token value; the average over
    feature sets does not grow with the number of deepstack layers."""
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 64, generator=generator), torch.randn(16, 64, generator=generator)
    for distance in ("mse", "cosine"):
        single = feature_distance(s, t, distance)
        doubled = feature_distance(torch.cat([s, s]), torch.cat([t, t]), distance)
        assert float(doubled) == approx(float(single))
        assert float(visual_kd_loss([s, s, s], [t, t, t], distance)) == approx(float(single))
    assert float(feature_distance(s, t, "mse")) == approx(float(((s - t) ** 2).mean()))


def test_duplicated_sample_keeps_loss_and_visual_term(visual):
    """Trainer level: a batch holding the same sample twice (twice the images and tokens) gives the same
    loss and the same vision_kd_loss as the sample alone."""
    trainer = visual
    values = []
    for rows in ([0], [0, 0]):
        with h.configured(trainer):
            batch = h.prepare(trainer, h.dataset_rows(trainer, rows))
            assert visual_tokens(batch["model_inputs"], 2) == 16 * len(rows)
            with torch.no_grad():
                loss = trainer.compute_loss(trainer.model, batch)
            values.append((float(loss), trainer._metrics["train"]["vision_kd_loss"][0]))
    (loss_one, vis_one), (loss_two, vis_two) = values
    assert vis_one > 0
    assert loss_two == approx(loss_one, rel=1e-4)
    assert vis_two == approx(vis_one, rel=1e-4)


def test_vision_kd_loss_logged_under_train_and_eval(visual):
    trainer = visual
    with h.configured(trainer):
        trainer.model.eval()
        batch = trainer._prepare_inputs(h.dataset_rows(trainer, [0]))
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        value = trainer._metrics["eval"]["vision_kd_loss"][0]
        logs = h.log_now(trainer)
    assert value > 0
    assert logs["eval_vision_kd_loss"] == approx(
        value,
    )
    rewritten = rewrite_logs(logs)
    assert [k for k in rewritten if k.endswith("vision_kd_loss")] == ["eval/vision_kd_loss"]


# --- missing targets and config rules (no model needed) --------------------------------------------------


class _Visual(nn.Module):
    def __init__(self, deepstack: bool) -> None:
        super().__init__()
        self.merger = nn.Linear(4, 4)
        if deepstack:
            self.deepstack_merger_list = nn.ModuleList([nn.Linear(4, 4)])


class _Model(nn.Module):
    def __init__(self, deepstack: bool = False, with_visual: bool = True) -> None:
        super().__init__()
        self.body = nn.Module()
        if with_visual:
            self.body.visual = _Visual(deepstack)


def test_missing_targets_raise_config_error_naming_the_key():
    with pytest.raises(ConfigError) as missing_deepstack:
        visual_targets(_Model(deepstack=False), ["merger", "deepstack"])
    assert missing_deepstack.value.key_path == "custom.visual_kd.targets"
    assert "deepstack" in str(missing_deepstack.value)

    with pytest.raises(ConfigError) as no_vision:
        visual_targets(_Model(with_visual=False), ["merger"])
    assert no_vision.value.key_path == "custom.visual_kd.targets"

    found = visual_targets(_Model(deepstack=True), ["merger", "deepstack"])
    assert sorted(found) == ["deepstack.0", "merger"]
    assert found["merger"] is not found["deepstack.0"]


def _resolve(env, *overrides):
    base = env.overrides("rules", extra=("custom.trainer_variant=gkd_monitor",))
    return ConfigLoader.resolve(h.STAGE2_GKD_DEMO, [*base, *overrides], check_files=False)


ENABLED = ("custom.visual_kd.enabled=true", "custom.visual_kd.weight=0.5", "tuner.freeze_aligner=false")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ((*ENABLED, "custom.visual_kd.weight=0"), "weight"),
        ((*ENABLED, "custom.visual_kd.targets=[merger, patch_embed]"), "targets"),
        ((*ENABLED, "custom.visual_kd.distance=l1"), "distance"),
        ((*ENABLED, "tuner.freeze_aligner=true"), "frozen"),
    ],
    ids=["enabled-needs-weight", "unknown-target", "unknown-distance", "frozen-aligner-and-vit"],
)
def test_visual_kd_config_rules_smoke(env, overrides, key):
    """One smoke check per spec-004 config rule (the loader's own tests cover them in depth)."""
    with pytest.raises(ConfigError) as error:
        _resolve(env, *overrides)
    text = str(error.value)
    assert "custom.visual_kd" in text
    if key == "frozen":
        assert "freeze_aligner" in text
    else:
        assert key in text


def test_visual_kd_config_valid_runs_gkd(env):
    config = _resolve(env, *ENABLED)
    assert config.mode == "gkd" and config.visual_kd_active
    assert (
        config.custom.visual_kd.targets == ["merger", "deepstack"]
        and config.custom.visual_kd.distance == "mse"
    )
