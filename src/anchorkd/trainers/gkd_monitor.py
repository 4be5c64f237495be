"""``GKDTrainerWithMetrics``: ms-swift's GKD trainer with weighted LM-head KD, visual KD and telemetry.

Loss per micro-batch (spec 003/004), with ``w = rlhf.llm_kd_weight``:
- ``w > 0``:  ``loss = w * jsd + sft_alpha * ce (+ visual_kd.weight * visual)``
- ``w == 0``: ``loss = 1.0 * ce (+ visual_kd.weight * visual)``; the LM-head KD branch is skipped and,
  without visual KD, the teacher never runs.
With ``w = 1`` and visual KD off, the value is the one stock ms-swift GKD computes on the same batch.
With anchor prompts (``custom.anchor``) the trainer adds anchor rows to every generation buffer
(``anchor_mix.py``) and flags them per row; they add ``anchor.weight * anchor_jsd`` and no CE
(``anchorkd.losses.anchor``), and the domain terms above cover the domain rows only.

Normalisation: every token term is ``sum over supervised positions / supervised positions of the whole
accumulation window`` (of its own kind of row: domain or anchor), so a batch of 4 in one step and the same 4 samples as 2 x 2 accumulated give the
same loss and gradients (stock GKD averages per-micro-batch means instead).

The math lives in ``anchorkd.losses``; this class gathers inputs (hidden states from hooks, teacher
outputs), composes the terms and logs each one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import defaultdict

import torch

from .. import swift_seam as seam
from ..config.settings import AnchorSettings
from ..errors import ConfigError
from ..losses.anchor import fused_anchored_ce_jsd, reference_anchored_ce_jsd, supervised_counts
from ..losses.fused import fused_ce_jsd
from ..losses.jsd import IGNORE_INDEX, generalized_jsd, masked_ce
from ..losses.visual import visual_kd_loss
from ..monitor.terms import METRIC_NAMES
from .anchor_mix import AnchorMixer, interleave
from .features import (
    STUDENT,
    TEACHER,
    FeatureCapture,
    find_language_body,
    find_lm_head,
    lm_head_weight,
    visual_targets,
)
from .resume import ResumableGKDMixin
from .sharding import ddp_loss_scale, gathered_params, global_window_tokens

logger = logging.getLogger("anchorkd")

BODY = "body"
TEACHER_HEAD = "teacher_lm_head"
_WINDOW_TOKENS = "anchorkd_window_tokens"
_WINDOW_VISUAL_TOKENS = "anchorkd_window_visual_tokens"
_WINDOW_ANCHOR_TOKENS = "anchorkd_window_anchor_tokens"
# Per-row flags of a micro-batch: [B] bool, True for anchor rows (set by this trainer, never by ms-swift).
ANCHOR_ROWS = "anchorkd_anchor_rows"
# The key that marks a drawn anchor row through ms-swift's sample building (it lands in GKDSample.extra).
ANCHOR_ROW_FLAG = "anchorkd_anchor_row"


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position t holds the token at t + 1."""
    shifted = torch.roll(labels, shifts=-1, dims=1)
    shifted[:, -1] = IGNORE_INDEX
    return shifted


def supervised_tokens(model_inputs: dict) -> int:
    return int((shift_labels(model_inputs["labels"]) != IGNORE_INDEX).sum())


def batch_token_counts(batch: dict) -> tuple[int, int]:
    """``(domain, anchor)`` supervised tokens of a prepared micro-batch."""
    return supervised_counts(shift_labels(batch[seam.MODEL_INPUTS]["labels"]), batch.get(ANCHOR_ROWS))


def visual_tokens(model_inputs: dict, merge_size: int) -> int:
    total = 0
    for key in ("image_grid_thw", "video_grid_thw"):
        grid = model_inputs.get(key)
        if grid is not None:
            total += int(grid.prod(-1).sum()) // (merge_size**2)
    return total


class GKDTrainerWithMetrics(ResumableGKDMixin, seam.gkd_trainer_base()):
    """Subclass of ms-swift's ``GKDTrainer`` (no ms-swift file is changed).

    ``anchor_settings`` (``RunSettings.anchor``) carries every anchorkd knob; the pipeline passes it, and
    ``anchor_rows`` (the anchor prompts as ms-swift loads a data set) when ``custom.anchor`` is set.
    """

    def __init__(self, model=None, *args, anchor_settings: AnchorSettings, anchor_rows=None, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.anchor = anchor_settings
        self._anchor_rows = anchor_rows
        self._anchor_mixer = self._make_anchor_mixer()
        self._pending_anchor_flags: list[list[bool]] | None = None
        # Our loss is already normalised over the accumulation window; HF must not divide it again.
        self.loss_is_scaled_for_ga = True
        self._metric_weights = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._warned_nonfinite: set[tuple[str, int]] = set()
        self._check_matches_settings()
        self._capture = FeatureCapture()
        self._register_hooks()
        self._warn_forward_only_knobs()

    # --- set-up --------------------------------------------------------------------------------

    def _make_anchor_mixer(self) -> AnchorMixer | None:
        if not self.anchor.anchor_prompts_active:
            return None
        if self._anchor_rows is None or len(self._anchor_rows) == 0:
            raise ConfigError(
                "custom.anchor.dataset",
                "the anchor prompts were not loaded: build trainers through anchorkd's pipeline",
            )
        rows_per_buffer = seam.rows_per_generation_buffer(self.args)
        mixer = AnchorMixer.for_step(
            len(self._anchor_rows),
            self.anchor.anchor_prompts.ratio,
            rows_per_buffer,
            int(self.args.seed),
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
        )
        logger.info(
            "anchor prompts: %d anchor rows + %d data-set rows per rank and generation buffer (share %.3f, "
            "custom.anchor.ratio %g), drawn from %d anchor rows",
            mixer.per_buffer,
            rows_per_buffer,
            mixer.share(rows_per_buffer),
            self.anchor.anchor_prompts.ratio,
            len(self._anchor_rows),
        )
        return mixer

    def _check_matches_settings(self) -> None:
        """The rules (``anchorkd.config.rules``) refused every unsupported combination before any model
        loaded; this only guards against a trainer built by hand around them."""
        if self.anchor.kd_active and self.teacher_mode != self.anchor.teacher_mode:
            raise ConfigError(
                "rlhf.teacher_model",
                f"the trainer got teacher mode {self.teacher_mode!r} but the settings say "
                f"{self.anchor.teacher_mode!r}: build trainers through anchorkd's pipeline",
            )

    @property
    def teacher_mode(self) -> str:
        """What ms-swift actually set up (checked against the settings at construction)."""
        if self.teacher_model is not None:
            return "separate"
        return "base_anchor" if seam.teacher_is_disabled_adapter(self) else "none"

    @property
    def visual_kd(self):
        return self.anchor.visual_kd

    def _register_hooks(self) -> None:
        student = self.accelerator.unwrap_model(self.model)
        shared_roles = (STUDENT, TEACHER) if self.anchor.teacher_mode == "base_anchor" else (STUDENT,)
        watched = {BODY: find_language_body(student)}
        if self.visual_kd.active:
            watched.update(visual_targets(student, self.visual_kd.targets))
        self._capture.watch(watched, roles=shared_roles)
        if self.teacher_model is not None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            teacher_watched = {BODY: find_language_body(teacher)}
            if self.visual_kd.active:
                teacher_watched.update(visual_targets(teacher, self.visual_kd.targets))
            self._capture.watch(teacher_watched, roles=(TEACHER,))

    def _warn_forward_only_knobs(self) -> None:
        if self.lmbda == 0:
            ignored = "the sampling role of temperature is ignored"
            if not (self.anchor.seq_kd or self.anchor.anchor_prompts_active):
                ignored = "max_completion_length and " + ignored.replace(" is ", " are ")
            else:
                ignored += (
                    " (max_completion_length limits only the teacher's answers: seq_kd, anchor prompts)"
                )
            logger.warning(
                "lmbda=0 (forward-only KD): the student never samples, so %s; temperature still softens "
                "both distributions in the JSD, as in ms-swift.",
                ignored,
            )

    # --- accumulation window --------------------------------------------------------------------

    def _prepare_inputs(self, inputs):
        training = self.model.training
        new_buffer = training and seam.starts_generation_buffer(self)
        batch = super()._prepare_inputs(inputs)
        if not training:
            self._annotate_window([batch])
        elif new_buffer:
            self._annotate_buffer(seam.generation_buffer(self))
        return batch

    # --- anchor rows: drawn per generation buffer, flagged per row ------------------------------------

    def _rollout_samples(self, inputs):
        """ms-swift's sample building (and, with probability lmbda, student sampling) over the buffer's
        data-set rows, then the buffer's anchor rows as they are.

        The anchor rows join after ms-swift's step, because in an on-policy buffer it strips every row's
        answer (its over-long-row resampling) and samples the student for each: an anchor row keeps its own
        answer or the teacher's, which take precedence over a student sample."""
        samples = super()._rollout_samples(inputs)
        if self._anchor_mixer is not None and self.model.training:
            buffer_index = seam.micro_batch_counter(self) // self.args.steps_per_generation
            drawn = [
                copy.deepcopy({**self._anchor_rows[i], ANCHOR_ROW_FLAG: True})
                for i in self._anchor_mixer.draw(buffer_index)
            ]
            samples = [*samples, *self.to_samples(drawn)]
        return samples

    def split_by_mini_batches(self, samples):
        """ms-swift's split of the data-set rows into micro-batches, each followed by its anchor rows."""
        anchors = [s for s in samples if s.extra.get(ANCHOR_ROW_FLAG)]
        if not anchors:
            return super().split_by_mini_batches(samples)
        domain = [s for s in samples if not s.extra.get(ANCHOR_ROW_FLAG)]
        chunks, self._pending_anchor_flags = interleave(super().split_by_mini_batches(domain), anchors)
        return chunks

    def _prepare_batch_inputs(self, samples):
        self._pending_anchor_flags = None
        batches = super()._prepare_batch_inputs(samples)
        flags, self._pending_anchor_flags = self._pending_anchor_flags, None
        if flags is not None:
            for batch, row_flags in zip(batches, flags, strict=True):
                device = batch[seam.MODEL_INPUTS]["labels"].device
                batch[ANCHOR_ROWS] = torch.tensor(row_flags, dtype=torch.bool, device=device)
        return batches

    def _annotate_buffer(self, buffer: list[dict]) -> None:
        accumulation = self.args.gradient_accumulation_steps
        if len(buffer) % accumulation == 0:
            for start in range(0, len(buffer), accumulation):
                self._annotate_window(buffer[start : start + accumulation], across_ranks=True)
            return
        # The generation buffer does not line up with optimizer steps: fall back to per-micro-batch
        # means averaged over the window (what stock GKD does).
        for batch in buffer:
            self._annotate_window([batch], scale=accumulation, across_ranks=True)

    def _annotate_window(self, window: list[dict], scale: int = 1, across_ranks: bool = False) -> None:
        """Token counts of the accumulation window that every token term is divided by (domain and anchor
        rows apart: each kind of term by its own rows' tokens). Training windows
        count every rank's tokens (one all-reduce), and ``compute_loss`` multiplies by the number of ranks:
        after the engine averages gradients over ranks, 2 ranks x batch 2 train exactly as 1 x batch 4."""
        merge = self._spatial_merge_size()
        counts = [batch_token_counts(b) for b in window]
        tokens = sum(domain for domain, _ in counts) * scale
        anchor_tokens = sum(anchor for _, anchor in counts) * scale
        vis_tokens = sum(visual_tokens(b[seam.MODEL_INPUTS], merge) for b in window) * scale
        if across_ranks:
            tokens, anchor_tokens, vis_tokens = global_window_tokens(
                [tokens, anchor_tokens, vis_tokens], self.accelerator.device
            )
        for batch in window:
            batch[_WINDOW_TOKENS] = tokens
            batch[_WINDOW_ANCHOR_TOKENS] = anchor_tokens
            batch[_WINDOW_VISUAL_TOKENS] = vis_tokens

    def _spatial_merge_size(self) -> int:
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        vision = getattr(config, "vision_config", None)
        return int(getattr(vision, "spatial_merge_size", 1) or 1)

    # --- loss --------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        model_inputs = inputs[seam.MODEL_INPUTS]
        if self.anchor.kd_active:
            self._check_teacher_alignment(model_inputs, inputs[seam.TEACHER_INPUTS])
        labels = shift_labels(model_inputs["labels"])
        anchor_rows = inputs.get(ANCHOR_ROWS)
        micro_tokens, micro_anchor_tokens = supervised_counts(labels, anchor_rows)
        window_tokens = max(int(inputs.get(_WINDOW_TOKENS, micro_tokens)), 1)
        window_anchor_tokens = max(int(inputs.get(_WINDOW_ANCHOR_TOKENS, micro_anchor_tokens)), 1)
        from_dataset = seam.batch_from_dataset(inputs)
        lm_kd = self.anchor.llm_kd_weight > 0
        anchored = self.anchor.anchor_prompts_active
        ce_weight = (self.args.sft_alpha if lm_kd else 1.0) if from_dataset else 0.0
        fused = self.anchor.kd_loss_impl == "fused"
        windows = (window_tokens, window_anchor_tokens)

        forward_inputs = {k: v for k, v in model_inputs.items() if k != "labels"}
        with self._capture.role(STUDENT) as student_features:
            outputs = model(**forward_inputs, **({"logits_to_keep": 1} if fused else {}))
        teacher_features: dict[str, torch.Tensor] = {}
        # Decided by the settings, not by the micro-batch, so every rank runs the same forwards (ZeRO-3
        # gathers parameters collectively inside them).
        need_lm = lm_kd or anchored
        if need_lm or self.visual_kd.active:
            teacher_inputs = {k: v for k, v in inputs[seam.TEACHER_INPUTS].items() if k != "labels"}
            teacher_features = self._run_teacher_forward(model, teacher_inputs, need_lm=need_lm, fused=fused)

        if fused:
            terms = self._fused_terms(
                model, student_features, teacher_features, labels, anchor_rows, windows, lm_kd
            )
        else:
            terms = self._reference_terms(outputs, teacher_features, labels, anchor_rows, windows, lm_kd)
        ce, jsd, anchor_jsd, correct = terms

        loss = ce_weight * ce
        micro_metrics = {"sft_loss": ce_weight * ce.detach()}
        if lm_kd:
            loss = loss + self.anchor.llm_kd_weight * jsd
            micro_metrics["llm_kd_loss"] = self.anchor.llm_kd_weight * jsd.detach()
        if anchored:
            anchor_weight = self.anchor.anchor_prompts.weight
            loss = loss + anchor_weight * anchor_jsd
            if micro_anchor_tokens:
                self._record_value(
                    mode,
                    "anchor_kd_loss",
                    anchor_weight * float(anchor_jsd.detach()) * window_anchor_tokens / micro_anchor_tokens,
                    micro_anchor_tokens,
                )
        visual = self._visual_term(student_features, teacher_features, model_inputs, inputs)
        if visual is not None:
            visual_mean, window_share, micro_visual_tokens = visual
            loss = loss + self.visual_kd.weight * visual_mean * window_share
            self._record_value(
                mode, "vision_kd_loss", self.visual_kd.weight * visual_mean.detach(), micro_visual_tokens
            )
        self._capture.clear()
        self._record(mode, micro_metrics, micro_tokens, window_tokens, correct, micro_anchor_tokens)
        if self.model.training:
            loss = loss * ddp_loss_scale()
        if return_outputs:
            return loss, outputs
        return loss

    @staticmethod
    def _check_teacher_alignment(model_inputs: dict, teacher_inputs: dict) -> None:
        """Both losses read student and teacher positions through the student's labels. ms-swift's OPSD
        rows (``teacher_prompt`` / ``teacher_images``) encode the teacher separately, and where that moves
        the response tokens the two would be silently misaligned (padded batches can even keep the
        shapes equal): refuse them instead."""
        student_labels, teacher_labels = model_inputs["labels"], teacher_inputs.get("labels")
        if teacher_labels is None or teacher_labels is student_labels:
            return
        if not torch.equal(teacher_labels, student_labels):
            raise ConfigError(
                "data.dataset",
                "rows with teacher_prompt / teacher_images that change the teacher's token positions "
                "(ms-swift OPSD) are not supported by gkd_monitor",
            )

    def _run_teacher_forward(self, model, teacher_inputs: dict, need_lm: bool, fused: bool) -> dict:
        """Teacher pass under no autograd. Returns captured features (and ``logits`` when not fused).

        The LM-head branch needs the teacher's language body; visual-only KD needs just the teacher's
        vision tower, so that is all that runs then. An offloaded teacher (``rlhf.offload_teacher_model``)
        is on the device only inside this pass; the fused loss then gets a device copy of its LM head
        (``TEACHER_HEAD``), read inside the pass, which lives until the loss's backward is done.
        """
        if self.teacher_model is not None:
            teacher, adapter_off = self.teacher_model, contextlib.nullcontext()
        else:  # base anchor: the student's own weights with the LoRA adapter switched off
            teacher = model
            adapter_off = self.accelerator.unwrap_model(model).disable_adapter()
        offloaded = self.teacher_model is not None and self.args.offload_teacher_model
        head = None
        with (
            seam.teacher_on_device(self),
            # no_grad, not inference_mode: ZeRO-3 / FSDP gather parameter storage inside this forward,
            # and inference tensors would break their gradient hooks later.
            torch.no_grad(),
            adapter_off,
            seam.disable_gradient_checkpointing(teacher, self.args.gradient_checkpointing_kwargs),
            self._capture.role(TEACHER) as captured,
        ):
            if need_lm:
                outputs = teacher(**teacher_inputs, **({"logits_to_keep": 1} if fused else {}))
                if not fused:
                    captured["logits"] = outputs.logits
                elif offloaded:
                    head = self._teacher_head_copy()
            else:
                self._teacher_vision_forward(teacher, teacher_inputs)
        features = dict(captured)
        if head is not None:
            features[TEACHER_HEAD] = head
        return features

    def _teacher_head_copy(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = lm_head_weight(find_lm_head(self.accelerator.unwrap_model(self.teacher_model)))
        with gathered_params([weight, bias]) as (full_weight, full_bias):
            return full_weight.detach().clone(), None if full_bias is None else full_bias.detach().clone()

    def _teacher_vision_forward(self, teacher, teacher_inputs: dict) -> None:
        body = find_language_body(self.accelerator.unwrap_model(teacher))
        if teacher_inputs.get("pixel_values") is not None:
            body.get_image_features(teacher_inputs["pixel_values"], teacher_inputs.get("image_grid_thw"))
        if teacher_inputs.get("pixel_values_videos") is not None:
            body.get_video_features(
                teacher_inputs["pixel_values_videos"], teacher_inputs.get("video_grid_thw")
            )

    def _fused_terms(self, model, student_features, teacher_features, labels, anchor_rows, windows, lm_kd):
        """(domain CE, domain JSD, anchor JSD, correct domain tokens) from hidden states."""
        anchored = self.anchor.anchor_prompts_active
        need_teacher = lm_kd or anchored
        student_model = self.accelerator.unwrap_model(model)
        weight, bias = lm_head_weight(find_lm_head(student_model))
        teacher_weight = teacher_bias = None
        if (
            need_teacher and TEACHER_HEAD in teacher_features
        ):  # offloaded teacher: the copy made on the device
            teacher_weight, teacher_bias = teacher_features[TEACHER_HEAD]
        elif need_teacher:
            teacher_model = self.teacher_model if self.teacher_model is not None else student_model
            teacher_head = find_lm_head(self.accelerator.unwrap_model(teacher_model))
            teacher_weight, teacher_bias = lm_head_weight(teacher_head, use_base=self.teacher_model is None)
        # Under ZeRO-3 / FSDP full-shard the heads hold only a shard after the forward: gather them for
        # the loss (a gradient still reaches the student's shard when its head trains).
        chunk = {"chunk_size": self.anchor.kd_chunk_size} if self.anchor.kd_chunk_size else {}
        with gathered_params([weight, bias, teacher_weight, teacher_bias]) as heads:
            weight, bias, teacher_weight, teacher_bias = heads
            if anchored:
                return fused_anchored_ce_jsd(
                    student_features[BODY],
                    weight,
                    labels,
                    anchor_rows,
                    teacher_features[BODY],
                    teacher_weight,
                    beta=self.beta,
                    temperature=self.temperature,
                    domain_items=windows[0],
                    anchor_items=windows[1],
                    domain_jsd=lm_kd,
                    student_lm_head_bias=bias,
                    teacher_lm_head_bias=teacher_bias,
                    **chunk,
                )
            result = fused_ce_jsd(
                student_features[BODY],
                weight,
                labels,
                teacher_features.get(BODY) if lm_kd else None,
                teacher_weight,
                beta=self.beta,
                temperature=self.temperature,
                **chunk,
                num_items=windows[0],
                compute_ce=True,
                compute_jsd=lm_kd,
                student_lm_head_bias=bias,
                teacher_lm_head_bias=teacher_bias,
            )
        return result.ce, result.jsd, result.jsd.new_zeros(()), int(result.correct_tokens)

    def _reference_terms(self, outputs, teacher_features, labels, anchor_rows, windows, lm_kd):
        logits = outputs.logits
        window_tokens = windows[0]
        if self.anchor.anchor_prompts_active:
            return reference_anchored_ce_jsd(
                logits,
                teacher_features["logits"],
                labels,
                anchor_rows,
                beta=self.beta,
                temperature=self.temperature,
                domain_items=window_tokens,
                anchor_items=windows[1],
                domain_jsd=lm_kd,
            )
        ce = masked_ce(logits, labels, num_items=window_tokens)
        if lm_kd:
            jsd = generalized_jsd(
                logits,
                teacher_features["logits"],
                labels,
                self.beta,
                self.temperature,
                num_items=window_tokens,
            )
        else:
            jsd = logits.new_zeros((), dtype=torch.float32)
        valid = labels != IGNORE_INDEX
        correct = int((logits.argmax(-1)[valid] == labels[valid]).sum())
        return ce, jsd, jsd.new_zeros(()), correct

    def _visual_term(self, student_features, teacher_features, model_inputs, inputs):
        """(per-token mean distance, this micro-batch's share of the window's visual tokens, its tokens)."""
        if not self.visual_kd.active:
            return None
        names = [name for name in student_features if name != BODY]
        if not names:
            return None  # a batch without images: nothing to anchor
        missing = [name for name in names if name not in teacher_features]
        if missing:
            raise RuntimeError(f"teacher forward produced no features for {missing}")
        term = visual_kd_loss(
            [student_features[n] for n in names],
            [teacher_features[n] for n in names],
            self.visual_kd.distance,
        )
        micro = visual_tokens(model_inputs, self._spatial_merge_size())
        window = max(int(inputs.get(_WINDOW_VISUAL_TOKENS, micro)), 1)
        return term, micro / window, micro

    # --- telemetry ----------------------------------------------------------------------------------

    def _record(
        self,
        mode: str,
        micro_metrics: dict,
        micro_tokens: int,
        window_tokens: int,
        correct: int,
        anchor_tokens: int = 0,
    ):
        """Store per-micro-batch values; token terms are converted back to this micro-batch's mean.
        ``token_count`` counts every supervised token, anchor rows' included."""
        to_micro_mean = window_tokens / max(micro_tokens, 1)
        for name, value in micro_metrics.items():
            self._record_value(mode, name, float(value) * to_micro_mean, micro_tokens)
        self._record_value(mode, "token_accuracy", correct / max(micro_tokens, 1), micro_tokens)
        seam.metric_store(self)[mode]["token_count"].append(float(micro_tokens + anchor_tokens))

    def _record_value(self, mode: str, name: str, value, weight: int) -> None:
        """Append one micro-batch value with its averaging weight; warn once per term and step on NaN/Inf."""
        value = float(value)
        step = int(self.state.global_step)
        if not math.isfinite(value) and (name, step) not in self._warned_nonfinite:
            self._warned_nonfinite.add((name, step))
            logger.warning("non-finite %s (%s) at step %d", name, value, step)
        seam.metric_store(self)[mode][name].append(value)
        self._metric_weights[mode][name].append(weight)

    def reduce_metrics(self, mode: str) -> dict[str, float]:
        """Token-weighted means since the last log, over accumulation steps and (under torchrun) ranks."""
        sums = []
        for name in METRIC_NAMES:
            values, weights = (
                seam.metric_store(self)[mode].get(name, []),
                self._metric_weights[mode].get(name, []),
            )
            if name == "token_count":
                sums += [sum(values), float(len(values))]
            else:
                sums += [sum(v * w for v, w in zip(values, weights, strict=True)), float(sum(weights))]
        totals = torch.tensor(sums, dtype=torch.float64, device=self.accelerator.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        reduced = {}
        for index, name in enumerate(METRIC_NAMES):
            total, weight = totals[2 * index].item(), totals[2 * index + 1].item()
            if weight > 0:
                reduced[name] = total if name == "token_count" else total / weight
        seam.metric_store(self)[mode].clear()
        self._metric_weights[mode].clear()
        return reduced

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for name, value in self.reduce_metrics(mode).items():
            key = name if name.startswith(prefix) else prefix + name
            logs[key] = value
        super().log(logs, start_time)
