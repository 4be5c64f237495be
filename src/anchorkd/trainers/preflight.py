"""Teacher/student compatibility check, run before any weights are loaded.

Logit-level KD compares the two models token by token, so both must read the same token ids the same
way: identical vocabulary, special-token ids, chat template and image preprocessing (a different pixel
budget changes how many visual tokens each model sees, which shifts every position after the image),
and logits over the same number of rows (a teacher whose LM head is padded to another size fails at the
first step). A mismatch found after an hour of training is an hour lost; here it costs a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import safetensors_shapes
from ..errors import AnchorKDError, ConfigError
from ..io import read_json_object, sha256_bytes

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
    tokens_by_id: tuple[str | None, ...] = ()  # the vocabulary, indexed by token id

    def differences(self, other: ProcessorFingerprint) -> list[str]:
        found = []
        if self.vocab_size != other.vocab_size:
            found.append(
                "tokenizer vocabulary size differs "
                f"(student {self.vocab_size} tokens, teacher {other.vocab_size})"
            )
        if self.vocab_sha256 != other.vocab_sha256:
            first = first_differing_token(self.tokens_by_id, other.tokens_by_id)
            if first is not None:
                token_id, mine, theirs = first
                found.append(
                    f"tokenizer vocabulary differs first at token id {token_id} "
                    f"(student {mine!r}, teacher {theirs!r})"
                )
            elif self.vocab_size == other.vocab_size:
                found.append("tokenizer vocabulary differs")
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


def first_differing_token(
    mine: tuple[str | None, ...], theirs: tuple[str | None, ...]
) -> tuple[int, str | None, str | None] | None:
    """The lowest token id the two vocabularies map differently (None where an id has no token)."""
    for token_id in range(max(len(mine), len(theirs))):
        a = mine[token_id] if token_id < len(mine) else None
        b = theirs[token_id] if token_id < len(theirs) else None
        if a != b:
            return token_id, a, b
    return None


SAME_ROWS_REASON = (
    "the KD loss compares the two models' logits row by row, so both need the same vocabulary size"
)


@dataclass(frozen=True)
class VocabShapes:
    """How many vocabulary rows a checkpoint's model has: ``vocab_size`` from config.json (its
    ``text_config`` for vision-language models) and the rows of the input embedding and the LM head from
    the safetensors headers (None where a file or tensor is missing)."""

    config_vocab_size: int | None
    embedding_rows: int | None
    lm_head_rows: int | None

    def differences(self, other: VocabShapes) -> list[str]:
        found = []
        for label, mine, theirs in (
            ("LM head rows differ", self.lm_head_rows, other.lm_head_rows),
            ("input embedding rows differ", self.embedding_rows, other.embedding_rows),
            ("config vocab_size differs", self.config_vocab_size, other.config_vocab_size),
        ):
            if mine is not None and theirs is not None and mine != theirs:
                found.append(f"{label} (student {mine}, teacher {theirs})")
        if found:
            found[0] += f": {SAME_ROWS_REASON}"
        return found


def vocab_shapes(checkpoint: str | Path) -> VocabShapes:
    """Read the vocabulary sizes of a checkpoint folder from config.json and the safetensors headers
    (tensor shapes only; no weights are read)."""
    folder = Path(checkpoint)
    config_path = folder / "config.json"
    config = read_json_object(config_path) if config_path.is_file() else {}
    text = config.get("text_config") or {}
    vocab_size = text.get("vocab_size", config.get("vocab_size"))
    shapes = safetensors_shapes(folder)  # ValueError naming an unreadable file
    embedding = _rows(shapes, lambda name: name.endswith("embed_tokens.weight") and "visual" not in name)
    lm_head = _rows(shapes, lambda name: name.endswith("lm_head.weight"))
    if lm_head is None and shapes:
        lm_head = embedding  # tied: the LM head is the input embedding
    return VocabShapes(vocab_size, embedding, lm_head)


def _rows(shapes: dict[str, list[int]], wanted) -> int | None:
    names = sorted(name for name in shapes if wanted(name))
    return shapes[names[0]][0] if names else None


def fingerprint(checkpoint: str | Path) -> ProcessorFingerprint:
    """Fingerprint a checkpoint folder from its tokenizer and processor files."""
    from transformers import AutoTokenizer

    folder = Path(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    vocab_bytes = json.dumps(sorted(vocab.items(), key=lambda item: item[1])).encode()
    tokens_by_id: list[str | None] = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, token_id in vocab.items():
        tokens_by_id[token_id] = token
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    template = _chat_template(folder, tokenizer)
    return ProcessorFingerprint(
        vocab_size=len(vocab),
        vocab_sha256=sha256_bytes(vocab_bytes),
        special_tokens=special,
        chat_template_sha256=sha256_bytes(template.encode()) if template else None,
        image_processor=_image_processor_settings(folder),
        tokens_by_id=tuple(tokens_by_id),
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


def _vocab_shapes(key_path: str, checkpoint: str) -> VocabShapes:
    try:
        return vocab_shapes(checkpoint)
    except AnchorKDError:  # config.json unreadable: the error names the file
        raise
    except ValueError as exc:  # a weights file whose header cannot be read
        raise ConfigError(key_path, str(exc)) from None


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
    student_rows = _vocab_shapes("model.model", student)
    differences = student_rows.differences(_vocab_shapes("rlhf.teacher_model", teacher))
    differences += fingerprint(student).differences(fingerprint(teacher))
    if differences:
        raise ConfigError(
            "rlhf.teacher_model",
            f"teacher {teacher} is not compatible with student {student}: " + "; ".join(differences),
        )
    return [
        "LM head / embedding rows and vocab_size",
        "vocabulary",
        "special-token ids",
        "chat template",
        "image-processor settings",
    ]
