"""``GKDTrainerWithMetrics``: ms-swift's GKD trainer with weighted LM-head KD, visual KD and telemetry.

Loss per micro-batch (spec 003/004), with ``w = rlhf.llm_kd_weight``, as named terms
(``anchorkd.losses.terms.LossTerms``, each logged under its name):
- ``sft_loss``: ``sft_alpha * ce`` when ``w > 0``, ``1.0 * ce`` when ``w == 0`` (0 on the student's own
  samples);
- ``llm_kd_loss``: ``w * jsd``, when ``w > 0``; with ``w == 0`` the LM-head KD branch is skipped and,
  without visual KD or anchor prompts, the teacher never runs;
- ``anchor_kd_loss``: ``anchor.weight * anchor_jsd`` with anchor prompts (``custom.anchor``): the trainer adds
  anchor rows to every generation buffer (``anchor_mix.py``) and flags them per row; they add no CE, and
  the two terms above cover the domain rows only;
- ``vision_kd_loss``: ``visual_kd.weight * visual`` with visual KD.
With ``w = 1`` and visual KD off, the value is the one stock ms-swift GKD computes on the same batch.

Normalisation: every token term is ``sum over supervised positions / supervised positions of the whole
accumulation window`` (of its own kind of row: domain or anchor), so a batch of 4 in one step and the
same 4 samples as 2 x 2 accumulated give the same loss and gradients (stock GKD averages per-micro-batch
means instead).

The math lives in ``anchorkd.losses``; this class gathers inputs (hidden states from hooks, teacher
outputs), composes the terms and logs each one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections import defaultdict

import torch

from .. import swift_seam as seam
from ..config.settings import AnchorSettings
from ..errors import ConfigError
from ..losses.anchor import supervised_counts
from ..losses.fused import DEFAULT_CHUNK_SIZE
from ..losses.jsd import IGNORE_INDEX
from ..losses.terms import (
    LossTerm,
    LossTerms,
    TokenLosses,
    TokenWindow,
    anchor_kd_term,
    ce_term,
    fused_token_losses,
    lm_kd_term,
    reference_token_losses,
    visual_kd_term,
)
from ..monitor.terms import METRIC_NAMES
from .anchor_mix import AnchorMixer, interleave, spread
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
from .sharding import bounded_all_reduce, ddp_loss_scale, gathered_params, global_window_tokens

logger = logging.getLogger("anchorkd")

# Name under which the hooks file the language body's final hidden state (the LM head's input); the
# visual targets are filed under their own names (``features.visual_targets``).
BODY = "body"

# Keys anchorkd adds to each micro-batch dict that ms-swift's ``_prepare_inputs`` builds (never set by
# ms-swift). Supervised tokens of the accumulation window, over all ranks: domain rows, anchor rows, and
# merged visual tokens.
WINDOW_TOKENS = "anchorkd_window_tokens"
WINDOW_ANCHOR_TOKENS = "anchorkd_window_anchor_tokens"
WINDOW_VISUAL_TOKENS = "anchorkd_window_visual_tokens"
# Per-row flags of a micro-batch: [B] bool, True for anchor rows.
ANCHOR_ROWS = "anchorkd_anchor_rows"
# The key that marks a drawn anchor row through ms-swift's sample building (it lands in GKDSample.extra).
ANCHOR_ROW_FLAG = "anchorkd_anchor_row"
# A micro-batch's cached teacher (``custom.teacher_cache``): a TeacherTopK on its supervised positions.
CACHED_TEACHER = "anchorkd_cached_teacher"


@dataclasses.dataclass
class TeacherPass:
    """What the teacher's forward leaves for the loss."""

    # The hooks' captures: BODY ([B, T, H_t], when the language model ran) and the visual targets.
    features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # [B, T, V] logits, for the reference loss only.
    logits: torch.Tensor | None = None
    # An offloaded teacher's LM head (weight, bias), copied to the device while the teacher was there.
    lm_head: tuple[torch.Tensor, torch.Tensor | None] | None = None


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position t holds the token at t + 1."""
    shifted = torch.roll(labels, shifts=-1, dims=1)
    shifted[:, -1] = IGNORE_INDEX
    return shifted


def without_labels(model_inputs: dict) -> dict:
    """The forward arguments of a collated batch (the loss reads the labels itself)."""
    return {key: value for key, value in model_inputs.items() if key != seam.LABELS}


def supervised_tokens(model_inputs: dict) -> int:
    return int((shift_labels(model_inputs[seam.LABELS]) != IGNORE_INDEX).sum())


def batch_token_counts(batch: dict) -> tuple[int, int]:
    """``(domain, anchor)`` supervised tokens of a prepared micro-batch."""
    return supervised_counts(shift_labels(batch[seam.MODEL_INPUTS][seam.LABELS]), batch.get(ANCHOR_ROWS))


def token_windows(
    batch: dict, labels: torch.Tensor, anchor_rows: torch.Tensor | None
) -> tuple[TokenWindow, TokenWindow]:
    """``(domain, anchor)`` supervised tokens of a micro-batch (``[B, T]`` shifted ``labels``, ``[B]``
    ``anchor_rows``) and of its accumulation window; a micro-batch without window counts is its own window."""
    domain, anchor = supervised_counts(labels, anchor_rows)
    return (
        TokenWindow(domain, max(int(batch.get(WINDOW_TOKENS, domain)), 1)),
        TokenWindow(anchor, max(int(batch.get(WINDOW_ANCHOR_TOKENS, anchor)), 1)),
    )


def visual_tokens(model_inputs: dict, merge_size: int) -> int:
    total = 0
    for key in (seam.IMAGE_GRID_THW, seam.VIDEO_GRID_THW):
        grid = model_inputs.get(key)
        if grid is not None:
            total += int(grid.prod(-1).sum()) // (merge_size**2)
    return total


def anchor_row_flags(rows_per_batch: list[int], anchors: int) -> list[list[bool]]:
    """Per-row anchor flags of micro-batches laid out by :func:`anchor_mix.interleave`: each micro-batch's
    data-set rows, then its share of the ``anchors`` anchor rows (:func:`anchor_mix.spread`)."""
    shares = spread(anchors, len(rows_per_batch))
    return [
        [False] * (rows - share) + [True] * share for rows, share in zip(rows_per_batch, shares, strict=True)
    ]


def is_anchor_sample(sample) -> bool:
    """Whether an ms-swift ``GKDSample`` is an anchor row (flagged in ``_rollout_samples``)."""
    return bool(sample.extra.get(ANCHOR_ROW_FLAG))


class GKDTrainerWithMetrics(ResumableGKDMixin, seam.gkd_trainer_base()):
    """Subclass of ms-swift's ``GKDTrainer`` (no ms-swift file is changed).

    ``anchor_settings`` (``RunSettings.anchor``) carries every anchorkd knob; the pipeline passes it, and
    ``anchor_rows`` (the anchor prompts as ms-swift loads a data set) when ``custom.anchor`` is set.
    """

    # The teacher cache (``custom.teacher_cache``) opened at construction; None: a live teacher.
    _teacher_cache = None

    def __init__(self, model=None, *args, anchor_settings: AnchorSettings, anchor_rows=None, **kwargs):
        super().__init__(model, *args, **kwargs)
        self.anchor = anchor_settings
        self._anchor_rows = anchor_rows
        self._anchor_mixer = self._make_anchor_mixer()
        self._teacher_cache = self._open_teacher_cache()
        # Our loss is already normalised over the accumulation window; HF must not divide it again.
        seam.mark_loss_scaled_for_accumulation(self)
        self._metric_weights = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._warned_nonfinite: set[tuple[str, int]] = set()
        self._check_matches_settings()
        self._capture = FeatureCapture()
        self._register_hooks()
        self._warn_forward_only_knobs()

    @property
    def anchor_rows(self):
        """The anchor prompts' rows (ms-swift's encoded dataset), or None without ``custom.anchor``; the
        teacher cache (``teacher_cache.py``) caches their targets too."""
        return self._anchor_rows

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

    def _open_teacher_cache(self):
        """The teacher cache of ``custom.teacher_cache`` (its settings were checked against the config before
        any model loaded), with every training, anchor and validation row in it: the first missing row is
        refused here, before the first step."""
        if self.anchor.teacher_cache is None:
            return None
        from .teacher_cache import TeacherCache, row_description, row_key

        cache = TeacherCache.open(self.anchor.teacher_cache)
        kinds = (
            ("training row", self.train_dataset),
            ("anchor row", self._anchor_rows or []),
            ("validation row", self.eval_dataset or []),
        )
        for kind, rows in kinds:
            for index, row in enumerate(rows):
                sample = self.to_samples([row])[0]
                cache.require([(row_key(sample), row_description(sample, f"{kind} {index}"))])
        logger.info(
            "teacher cache: %s (%d rows, k=%d); no teacher runs", cache.folder, len(cache), cache.settings.k
        )
        return cache

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
        if seam.teacher_is_disabled_adapter(self):
            return "base_anchor"
        return "cached" if self._teacher_cache is not None else "none"

    @property
    def visual_kd(self):
        return self.anchor.visual_kd

    def _register_hooks(self) -> None:
        student = self.accelerator.unwrap_model(self.model)
        shared_roles = (STUDENT, TEACHER) if self.anchor.teacher_mode == "base_anchor" else (STUDENT,)
        watched = {BODY: find_language_body(student)}
        if self.anchor.visual_kd_active:
            watched.update(visual_targets(student, self.visual_kd.targets))
        self._capture.watch(watched, roles=shared_roles)
        if self.teacher_model is not None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            teacher_watched = {BODY: find_language_body(teacher)}
            if self.anchor.visual_kd_active:
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
        """ms-swift's split of the data-set rows into micro-batches, each followed by its share of the anchor
        rows (``anchor_mix.interleave``)."""
        anchors = [s for s in samples if is_anchor_sample(s)]
        if not anchors:
            chunks = super().split_by_mini_batches(samples)
        else:
            domain = [s for s in samples if not is_anchor_sample(s)]
            chunks, _ = interleave(super().split_by_mini_batches(domain), anchors)
        self._last_split = chunks  # the rows of each micro-batch, for the cached teacher
        return chunks

    def _prepare_batch_inputs(self, samples):
        """ms-swift's micro-batches of the buffer (split as above); with anchor rows in it, each micro-batch
        gets its per-row flags (``ANCHOR_ROWS``), read off the layout the split made; with a teacher cache,
        its rows' cached teacher (``CACHED_TEACHER``), found by each row's key."""
        cached_rows = self._cached_row_ids(samples)  # before encoding, which edits the messages in place
        batches = super()._prepare_batch_inputs(samples)
        if cached_rows is not None:
            from .teacher_cache import batch_teacher

            for batch, chunk in zip(batches, self._last_split, strict=True):
                labels = shift_labels(batch[seam.MODEL_INPUTS][seam.LABELS])
                batch[CACHED_TEACHER] = batch_teacher(
                    self._teacher_cache, [cached_rows[id(sample)] for sample in chunk], labels
                )
        anchors = sum(1 for sample in samples if is_anchor_sample(sample))
        if anchors:
            labels = [batch[seam.MODEL_INPUTS][seam.LABELS] for batch in batches]
            flags = anchor_row_flags([len(rows) for rows in labels], anchors)
            for batch, rows, row_flags in zip(batches, labels, flags, strict=True):
                batch[ANCHOR_ROWS] = torch.tensor(row_flags, dtype=torch.bool, device=rows.device)
        return batches

    def _cached_row_ids(self, samples) -> dict[int, tuple[str, str]] | None:
        """Per sample (by identity) its cache key and description, with a teacher cache; else None."""
        if self._teacher_cache is None:
            return None
        from .teacher_cache import row_description, row_key

        return {
            id(sample): (
                row_key(sample),
                row_description(sample, "anchor row" if is_anchor_sample(sample) else "row"),
            )
            for sample in samples
        }

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
            batch[WINDOW_TOKENS] = tokens
            batch[WINDOW_ANCHOR_TOKENS] = anchor_tokens
            batch[WINDOW_VISUAL_TOKENS] = vis_tokens

    def _spatial_merge_size(self) -> int:
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        vision = getattr(config, "vision_config", None)
        return int(getattr(vision, "spatial_merge_size", 1) or 1)

    # --- loss --------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of one micro-batch: the student's forward, the teacher's (when a KD term needs it), the
        named terms of ``anchorkd.losses.terms``, each logged; their sum is the loss."""
        mode = "train" if self.model.training else "eval"
        model_inputs = inputs[seam.MODEL_INPUTS]
        if self.anchor.kd_active:
            self._check_teacher_alignment(model_inputs, inputs[seam.TEACHER_INPUTS])
        labels = shift_labels(model_inputs[seam.LABELS])
        anchor_rows = inputs.get(ANCHOR_ROWS)
        domain_tokens, anchor_tokens = token_windows(inputs, labels, anchor_rows)
        fused = self.anchor.kd_loss_impl == "fused"

        with self._capture.role(STUDENT) as student_features:
            # The fused loss starts from the hidden states: the model computes logits for one position only.
            outputs = model(**without_labels(model_inputs), **({"logits_to_keep": 1} if fused else {}))
        teacher = TeacherPass()
        # Decided by the settings, not by the micro-batch, so every rank runs the same forwards (ZeRO-3
        # gathers parameters collectively inside them).
        need_lm = self._teacher_language_model_runs and self._teacher_cache is None
        if need_lm or self.anchor.visual_kd_active:
            teacher_inputs = without_labels(inputs[seam.TEACHER_INPUTS])
            teacher = self.run_teacher_forward(model, teacher_inputs, need_lm=need_lm, fused=fused)

        if self._teacher_cache is not None:
            token_losses = self._cached_token_losses(
                model,
                student_features.get(BODY),
                outputs,
                inputs,
                labels,
                anchor_rows,
                domain_tokens,
                anchor_tokens,
            )
        elif fused:
            token_losses = self._fused_token_losses(
                model, student_features[BODY], teacher, labels, anchor_rows, domain_tokens, anchor_tokens
            )
        else:
            token_losses = reference_token_losses(
                outputs.logits,
                teacher.logits,
                labels,
                anchor_rows,
                **self._token_loss_settings(domain_tokens, anchor_tokens),
            )
        settings = self.anchor
        terms = LossTerms(
            sft_loss=ce_term(token_losses.ce, self._ce_weight(inputs), domain_tokens),
            llm_kd_loss=(
                lm_kd_term(token_losses.jsd, settings.llm_kd_weight, domain_tokens)
                if settings.lm_kd_active
                else None
            ),
            anchor_kd_loss=(
                anchor_kd_term(token_losses.anchor_jsd, settings.anchor_prompts.weight, anchor_tokens)
                if settings.anchor_prompts_active
                else None
            ),
            vision_kd_loss=self._visual_term(student_features, teacher.features, model_inputs, inputs),
        )
        self._capture.clear()
        self._record(mode, terms, domain_tokens.micro, anchor_tokens.micro, token_losses.correct_tokens)
        loss = terms.total()
        if self.model.training:
            loss = loss * ddp_loss_scale()
        if return_outputs:
            return loss, outputs
        return loss

    @property
    def _teacher_language_model_runs(self) -> bool:
        """The teacher's LM-head distribution is needed: LM-head KD, or the anchor rows' KD."""
        return self.anchor.lm_kd_active or self.anchor.anchor_prompts_active

    def _ce_weight(self, inputs: dict) -> float:
        """``sft_alpha`` beside LM-head KD, 1 without it; 0 when the responses are the student's own samples."""
        if not seam.batch_from_dataset(inputs):
            return 0.0
        return self.args.sft_alpha if self.anchor.lm_kd_active else 1.0

    def _token_loss_settings(self, domain_tokens: TokenWindow, anchor_tokens: TokenWindow) -> dict:
        """The keyword arguments that the fused and the reference token losses share."""
        return {
            "beta": self.beta,
            "temperature": self.temperature,
            "domain_items": domain_tokens.window,
            "anchor_items": anchor_tokens.window,
            "lm_kd": self.anchor.lm_kd_active,
            "anchored": self.anchor.anchor_prompts_active,
        }

    @staticmethod
    def _check_teacher_alignment(model_inputs: dict, teacher_inputs: dict) -> None:
        """Both losses read student and teacher positions through the student's labels. ms-swift's OPSD
        rows (``teacher_prompt`` / ``teacher_images``) encode the teacher separately, and where that moves
        the response tokens the two would be silently misaligned (padded batches can even keep the
        shapes equal): refuse them instead."""
        student_labels, teacher_labels = model_inputs[seam.LABELS], teacher_inputs.get(seam.LABELS)
        if teacher_labels is None or teacher_labels is student_labels:
            return
        if not torch.equal(teacher_labels, student_labels):
            raise ConfigError(
                "data.dataset",
                "rows with teacher_prompt / teacher_images that change the teacher's token positions "
                "(ms-swift OPSD) are not supported by gkd_monitor",
            )

    def run_teacher_forward(self, model, teacher_inputs: dict, need_lm: bool, fused: bool) -> TeacherPass:
        """Teacher pass under no autograd: its captured features (and logits when not fused).

        The LM-head branch needs the teacher's language body; visual-only KD needs just the teacher's
        vision tower, so that is all that runs then. An offloaded teacher (``rlhf.offload_teacher_model``)
        is on the device only inside this pass; the fused loss then gets a device copy of its LM head,
        read inside the pass, which lives until the loss's backward is done. Public: ``anchorkd
        teacher-cache`` runs the teacher through it, so the cache holds what a live step sees.
        """
        if self.teacher_model is not None:
            teacher, adapter_off = self.teacher_model, contextlib.nullcontext()
        else:  # base anchor: the student's own weights with the LoRA adapter switched off
            teacher = model
            adapter_off = self.accelerator.unwrap_model(model).disable_adapter()
        offloaded = self.teacher_model is not None and self.args.offload_teacher_model
        result = TeacherPass()
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
                    result.logits = outputs.logits
                elif offloaded:
                    result.lm_head = self._teacher_head_copy()
            else:
                self._teacher_vision_forward(teacher, teacher_inputs)
        result.features = dict(captured)
        return result

    def _teacher_head_copy(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = lm_head_weight(find_lm_head(self.accelerator.unwrap_model(self.teacher_model)))
        with gathered_params([weight, bias]) as (full_weight, full_bias):
            return full_weight.detach().clone(), None if full_bias is None else full_bias.detach().clone()

    def _teacher_vision_forward(self, teacher, teacher_inputs: dict) -> None:
        body = find_language_body(self.accelerator.unwrap_model(teacher))
        if teacher_inputs.get(seam.PIXEL_VALUES) is not None:
            body.get_image_features(
                teacher_inputs[seam.PIXEL_VALUES], teacher_inputs.get(seam.IMAGE_GRID_THW)
            )
        if teacher_inputs.get(seam.VIDEO_PIXEL_VALUES) is not None:
            body.get_video_features(
                teacher_inputs[seam.VIDEO_PIXEL_VALUES], teacher_inputs.get(seam.VIDEO_GRID_THW)
            )

    def _teacher_lm_head(self, student_model) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's LM head where it lives: the separate teacher's, or the student's frozen base."""
        if self.teacher_model is None:
            return lm_head_weight(find_lm_head(student_model), use_base=True)
        return lm_head_weight(find_lm_head(self.accelerator.unwrap_model(self.teacher_model)))

    def _fused_token_losses(
        self,
        model,
        student_hidden: torch.Tensor,
        teacher: TeacherPass,
        labels: torch.Tensor,
        anchor_rows: torch.Tensor | None,
        domain_tokens: TokenWindow,
        anchor_tokens: TokenWindow,
    ) -> TokenLosses:
        """:func:`~anchorkd.losses.terms.fused_token_losses` on the LM heads, gathered where they are sharded."""
        student_model = self.accelerator.unwrap_model(model)
        weight, bias = lm_head_weight(find_lm_head(student_model))
        teacher_weight = teacher_bias = None
        if self._teacher_language_model_runs:
            head = teacher.lm_head  # an offloaded teacher's copy, made on the device
            teacher_weight, teacher_bias = head if head is not None else self._teacher_lm_head(student_model)
        # Under ZeRO-3 / FSDP full-shard the heads hold only a shard after the forward: gather them for
        # the loss (a gradient still reaches the student's shard when its head trains).
        with gathered_params([weight, bias, teacher_weight, teacher_bias]) as heads:
            weight, bias, teacher_weight, teacher_bias = heads
            return fused_token_losses(
                student_hidden,
                weight,
                labels,
                anchor_rows,
                teacher.features.get(BODY),
                teacher_weight,
                **self._token_loss_settings(domain_tokens, anchor_tokens),
                chunk_size=self.anchor.kd_chunk_size or DEFAULT_CHUNK_SIZE,
                student_lm_head_bias=bias,
                teacher_lm_head_bias=teacher_bias,
            )

    def _cached_token_losses(
        self,
        model,
        student_hidden: torch.Tensor | None,
        outputs,
        inputs: dict,
        labels: torch.Tensor,
        anchor_rows: torch.Tensor | None,
        domain_tokens: TokenWindow,
        anchor_tokens: TokenWindow,
    ) -> TokenLosses:
        """The token losses against the cached teacher of the micro-batch (``custom.teacher_cache``): the
        fused top-k + tail JSD from the student's hidden states, or the reference one from its logits."""
        from ..losses.topk import reference_topk_token_losses, topk_token_losses

        teacher = inputs.get(CACHED_TEACHER)
        if teacher is None:
            raise RuntimeError(
                "a micro-batch without its cached teacher: build trainers through anchorkd's pipeline"
            )
        settings = self._token_loss_settings(domain_tokens, anchor_tokens)
        if self.anchor.kd_loss_impl != "fused":
            return reference_topk_token_losses(outputs.logits, labels, anchor_rows, teacher, **settings)
        weight, bias = lm_head_weight(find_lm_head(self.accelerator.unwrap_model(model)))
        with gathered_params([weight, bias]) as (weight, bias):
            return topk_token_losses(
                student_hidden,
                weight,
                labels,
                anchor_rows,
                teacher,
                **settings,
                chunk_size=self.anchor.kd_chunk_size or DEFAULT_CHUNK_SIZE,
                student_lm_head_bias=bias,
            )

    def _visual_term(self, student_features, teacher_features, model_inputs, inputs) -> LossTerm | None:
        """``vision_kd_loss`` over the captured visual targets; None without visual KD or without images."""
        if not self.anchor.visual_kd_active:
            return None
        names = [name for name in student_features if name != BODY]
        if not names:
            return None  # a batch without images: nothing to anchor
        missing = [name for name in names if name not in teacher_features]
        if missing:
            raise RuntimeError(f"teacher forward produced no features for {missing}")
        micro = visual_tokens(model_inputs, self._spatial_merge_size())
        return visual_kd_term(
            [student_features[n] for n in names],
            [teacher_features[n] for n in names],
            self.visual_kd.distance,
            self.visual_kd.weight,
            TokenWindow(micro, max(int(inputs.get(WINDOW_VISUAL_TOKENS, micro)), 1)),
        )

    # --- telemetry ----------------------------------------------------------------------------------

    def _record(self, mode: str, terms: LossTerms, domain_tokens: int, anchor_tokens: int, correct: int):
        """Store each term's micro-batch value with its token weight, then the domain tokens' accuracy and
        ``token_count`` (every supervised token, anchor rows' included)."""
        for name, term in terms.present():
            if term.logged is not None:
                self._record_value(mode, name, term.logged, term.tokens)
        self._record_value(mode, "token_accuracy", correct / max(domain_tokens, 1), domain_tokens)
        seam.metric_store(self)[mode]["token_count"].append(float(domain_tokens + anchor_tokens))

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
            bounded_all_reduce(totals, "the logged loss terms")
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
