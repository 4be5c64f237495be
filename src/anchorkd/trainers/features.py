"""Forward hooks that capture module outputs during the normal forward passes (no extra compute).

Used for two things:
- the final hidden state of the language model body (input of the LM head), so the fused KD loss can
  work from hidden states and the full ``[B, T, V]`` logits are never built;
- the outputs of ``visual.merger`` and ``visual.deepstack_merger_list[i]`` for feature-level visual KD.

The student and a base-anchor teacher can be the same module tree (teacher = student with its LoRA
adapter disabled), so captures are filed under the *role* that is active when the hook fires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .. import swift_seam as seam
from ..errors import ConfigError

STUDENT = "student"
TEACHER = "teacher"


def find_visual_module(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The Qwen-VL vision tower (the module with a ``merger``), wherever wrappers put it."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "visual" and hasattr(module, "merger"):
            return name, module
    return None


def find_language_body(model: nn.Module) -> nn.Module:
    """The module whose output's ``last_hidden_state`` feeds the LM head (``Qwen3VLModel``)."""
    for _, module in model.named_modules():
        # The *ForConditionalGeneration wrapper exposes the same attributes as properties; the body is
        # the one without the LM head.
        if hasattr(module, "language_model") and hasattr(module, "visual") and not hasattr(module, "lm_head"):
            return module
    raise ValueError(f"cannot find the language model body in {type(model).__name__}")


def find_lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head


def lm_head_weight(head: nn.Module, use_base: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight and bias; ``use_base`` reads through a PEFT wrapper to the frozen base."""
    if use_base:
        head = seam.peft_base_layer(head)
    return head.weight, getattr(head, "bias", None)


def visual_targets(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Module]:
    """Modules for ``custom.visual_kd.targets``; a clear error when a target does not exist."""
    found = find_visual_module(model)
    if found is None:
        raise ConfigError(
            "custom.visual_kd.targets",
            f"{type(model).__name__} has no vision tower with a merger (visual.merger): visual KD needs a "
            "Qwen-VL style model",
        )
    prefix, visual = found
    modules: dict[str, nn.Module] = {}
    for target in targets:
        if target == "merger":
            modules["merger"] = visual.merger
        elif target == "deepstack":
            deepstack = getattr(visual, "deepstack_merger_list", None)
            if deepstack is None or len(deepstack) == 0:
                raise ConfigError(
                    "custom.visual_kd.targets",
                    f"target 'deepstack' not found: {prefix}.deepstack_merger_list does not exist on this model",
                )
            for index, module in enumerate(deepstack):
                modules[f"deepstack.{index}"] = module
        else:
            raise ConfigError(
                "custom.visual_kd.targets", f"unknown target {target!r}; use merger or deepstack"
            )
    return modules


class FeatureCapture:
    """Record outputs of named modules, filed under the role (student / teacher) active at the time."""

    def __init__(self) -> None:
        self._handles: list = []
        self._role: str | None = None
        self.features: dict[str, dict[str, torch.Tensor]] = {STUDENT: {}, TEACHER: {}}

    def watch(self, modules: dict[str, nn.Module], roles: Iterable[str] = (STUDENT, TEACHER)) -> None:
        allowed = frozenset(roles)
        for name, module in modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name, allowed)))

    def _hook(self, name: str, roles: frozenset[str]):
        def record(_module, _inputs, output):
            if self._role not in roles:
                return  # e.g. generation during on-policy sampling: nothing to distil
            value = output.last_hidden_state if hasattr(output, "last_hidden_state") else output
            if isinstance(value, tuple):
                value = value[0]
            self.features[self._role][name] = value

        return record

    @contextlib.contextmanager
    def role(self, role: str) -> Iterator[dict[str, torch.Tensor]]:
        previous, self._role = self._role, role
        self.features[role] = {}
        try:
            yield self.features[role]
        finally:
            self._role = previous

    def clear(self) -> None:
        self.features = {STUDENT: {}, TEACHER: {}}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
