"""Teacher/student compatibility check, run before any weights are loaded.

Logit-level KD compares the two models token by token, so both must read the same token ids the same
way: identical vocabulary, special-token ids, chat template and image preprocessing (a different pixel
budget changes how many visual tokens each model sees, which shifts every position after the image).
A mismatch found after an hour of training is an hour lost; here it costs a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..io import sha256_bytes

IMAGE_PROCESSOR_KEYS = (
    "size",
    "min_pixels",
    "max_pixels",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "image_mean",
    "image_std",
    "do_resize",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
)


@dataclass(frozen=True)
class ProcessorFingerprint:
    """What must match between teacher and student, read from a checkpoint folder's files."""

    vocab_size: int
    vocab_sha256: str
    special_tokens: dict[str, int]
    chat_template_sha256: str | None
    image_processor: dict

    def differences(self, other: ProcessorFingerprint) -> list[str]:
        found = []
        if self.vocab_size != other.vocab_size or self.vocab_sha256 != other.vocab_sha256:
            found.append(
                f"tokenizer vocabulary differs (student {self.vocab_size} tokens, teacher {other.vocab_size})"
            )
        for name in sorted(set(self.special_tokens) | set(other.special_tokens)):
            mine, theirs = self.special_tokens.get(name), other.special_tokens.get(name)
            if mine != theirs:
                found.append(f"special token {name!r} id differs (student {mine}, teacher {theirs})")
        if self.chat_template_sha256 != other.chat_template_sha256:
            found.append("chat template differs")
        for key in sorted(set(self.image_processor) | set(other.image_processor)):
            mine, theirs = self.image_processor.get(key), other.image_processor.get(key)
            if mine != theirs:
                found.append(f"image processor setting {key!r} differs (student {mine}, teacher {theirs})")
        return found


def fingerprint(checkpoint: str | Path) -> ProcessorFingerprint:
    """Fingerprint a checkpoint folder from its tokenizer and processor files."""
    from transformers import AutoTokenizer

    folder = Path(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    vocab_bytes = json.dumps(sorted(vocab.items(), key=lambda item: item[1])).encode()
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    template = _chat_template(folder, tokenizer)
    return ProcessorFingerprint(
        vocab_size=len(vocab),
        vocab_sha256=sha256_bytes(vocab_bytes),
        special_tokens=special,
        chat_template_sha256=sha256_bytes(template.encode()) if template else None,
        image_processor=_image_processor_settings(folder),
    )


def _chat_template(folder: Path, tokenizer) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def _image_processor_settings(folder: Path) -> dict:
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get("image_processor", data)
            return {key: data[key] for key in IMAGE_PROCESSOR_KEYS if key in data}
    return {}


def teacher_base_path(config) -> str | None:
    """Folder whose processor files the teacher uses (the student's own base when it equals the model)."""
    rlhf = config.sections["rlhf"]
    return rlhf.get("teacher_model") or None


def run_preflight(config) -> list[str]:
    """Compare student and teacher; raise ConfigError naming every difference. Returns checks done."""
    student = config.sections["model"]["model"]
    teacher = teacher_base_path(config)
    if teacher is None:
        return []
    if Path(student).expanduser().resolve() == Path(teacher).expanduser().resolve():
        return ["teacher is the student's own base checkpoint: processors identical by construction"]
    if not (Path(student).is_dir() and Path(teacher).is_dir()):
        return ["hub checkpoints: compatibility not checked locally"]
    differences = fingerprint(student).differences(fingerprint(teacher))
    if differences:
        raise ConfigError(
            "rlhf.teacher_model",
            f"teacher {teacher} is not compatible with student {student}: " + "; ".join(differences),
        )
    return ["vocabulary", "special-token ids", "chat template", "image-processor settings"]
