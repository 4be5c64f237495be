"""Teacher/student comparison pieces that need no tokenizer: vocabulary sizes read from config.json and
the safetensors headers, and naming the first token id two vocabularies map differently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from anchorkd.trainers.preflight import ProcessorFingerprint, VocabShapes, first_differing_token, vocab_shapes


def checkpoint(folder: Path, config: dict, tensors: dict[str, tuple[int, ...]], shards: int = 1) -> Path:
    """A checkpoint folder with config.json and zero-filled tensors of the given shapes."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    arrays = {name: np.zeros(shape, dtype=np.float32) for name, shape in tensors.items()}
    if shards == 1:
        save_file(arrays, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    names = sorted(arrays)
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: arrays[name] for name in names[shard::shards]}
        save_file(part, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


VL_TENSORS = {
    "model.language_model.embed_tokens.weight": (12, 4),
    "lm_head.weight": (12, 4),
    "model.visual.pos_embed.weight": (99, 4),  # a vision embedding: not the vocabulary
}


def test_vocab_shapes_of_a_vision_language_checkpoint(tmp_path):
    folder = checkpoint(tmp_path / "vl", {"text_config": {"vocab_size": 12}}, VL_TENSORS)
    assert vocab_shapes(folder) == VocabShapes(config_vocab_size=12, embedding_rows=12, lm_head_rows=12)


def test_vocab_shapes_of_a_sharded_text_checkpoint_with_tied_head(tmp_path):
    tensors = {"model.embed_tokens.weight": (20, 4), "model.norm.weight": (4,), "model.layers.0.w": (4, 4)}
    folder = checkpoint(tmp_path / "llm", {"vocab_size": 20, "tie_word_embeddings": True}, tensors, shards=2)
    assert vocab_shapes(folder) == VocabShapes(20, 20, 20)


def test_vocab_shapes_without_safetensors_reads_the_config_only(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vocab_size": 7}))
    assert vocab_shapes(folder) == VocabShapes(7, None, None)


def test_padded_teacher_is_named_by_rows_and_vocab_size():
    student = VocabShapes(151936, 151936, 151936)
    teacher = VocabShapes(152064, 152064, 152064)
    assert student.differences(teacher) == [
        "LM head rows differ (student 151936, teacher 152064): the KD loss compares the two models' logits "
        "row by row, so both need the same vocabulary size",
        "input embedding rows differ (student 151936, teacher 152064)",
        "config vocab_size differs (student 151936, teacher 152064)",
    ]
    assert student.differences(VocabShapes(151936, None, None)) == []
    assert student.differences(student) == []


@pytest.mark.parametrize(
    ("mine", "theirs", "expected"),
    [
        (("a", "b", "c"), ("a", "b", "c"), None),
        (("a", "b", "c"), ("a", "c", "b"), (1, "b", "c")),
        (("a", "b"), ("a", "b", "c"), (2, None, "c")),
        (("a", None, "c"), ("a", "x", "c"), (1, None, "x")),
    ],
)
def test_first_differing_token(mine, theirs, expected):
    assert first_differing_token(mine, theirs) == expected


def fingerprint(tokens: tuple[str, ...]) -> ProcessorFingerprint:
    return ProcessorFingerprint(
        vocab_size=len(tokens),
        vocab_sha256=str(hash(tokens)),
        special_tokens={},
        chat_template_sha256=None,
        image_processor={},
        tokens_by_id=tokens,
    )


def test_same_size_vocabularies_that_map_differently_name_the_first_id():
    student, teacher = fingerprint(("a", "b", "c", "d")), fingerprint(("a", "b", "d", "c"))
    assert student.differences(teacher) == [
        "tokenizer vocabulary differs first at token id 2 (student 'c', teacher 'd')"
    ]


def test_vocabularies_of_different_sizes_name_the_sizes_and_the_first_id():
    student, teacher = fingerprint(("a", "b")), fingerprint(("a", "b", "c"))
    assert student.differences(teacher) == [
        "tokenizer vocabulary size differs (student 2 tokens, teacher 3)",
        "tokenizer vocabulary differs first at token id 2 (student None, teacher 'c')",
    ]
