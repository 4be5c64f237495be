"""The embedded tiny Qwen3-VL checkpoint: real architecture and vocabulary, deterministic, loadable by ms-swift."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchorkd.demo.tiny_model import QWEN_VOCAB_SIZE, make_tiny_model

IMAGE_PAD_ID = 151655  # hard-coded by ms-swift's qwen3_vl template
VIDEO_PAD_ID = 151656


def staging_leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_checkpoint_config_has_the_real_model_type_and_vocabulary(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["text_config"]["vocab_size"] == QWEN_VOCAB_SIZE == 151936
    assert config["text_config"]["hidden_size"] == 64
    assert config["vision_config"]["out_hidden_size"] == 64
    assert config["vision_config"]["deepstack_visual_indexes"] == [0, 1]
    meta = json.loads((tiny_model_dir / "anchorkd_tiny.json").read_text())
    assert meta["seed"] == 0
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (tiny_model_dir / name).is_file(), name


def test_tokenizer_uses_the_real_vision_token_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert tokenizer.encode("<|image_pad|>", add_special_tokens=False) == [IMAGE_PAD_ID]
    assert tokenizer.encode("<|video_pad|>", add_special_tokens=False) == [VIDEO_PAD_ID]
    assert tokenizer.convert_ids_to_tokens([IMAGE_PAD_ID, VIDEO_PAD_ID]) == ["<|image_pad|>", "<|video_pad|>"]


def test_make_tiny_model_is_deterministic_per_seed(tiny_model_dir, tmp_path):
    # The session checkpoint was built with seed 0: a second seed-0 build must match it byte for byte.
    again = make_tiny_model(tmp_path / "seed0", seed=0)
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (again / "config.json").read_text() == (tiny_model_dir / "config.json").read_text()
    assert (other / "model.safetensors").read_bytes() != weights
    assert (other / "config.json").read_text() == (tiny_model_dir / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0", "seed1"]  # no staging folder left


def test_make_tiny_model_refuses_a_non_empty_dir(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        make_tiny_model(out)
    assert [p.name for p in out.iterdir()] == ["weights.bin"]
    assert (out / "weights.bin").read_bytes() == b"mine"
    assert staging_leftovers(tmp_path, "model") == []


def test_ms_swift_loads_the_tiny_checkpoint(tiny_model_dir):
    import torch
    from swift.model import get_model_processor
    from transformers import Qwen3VLForConditionalGeneration

    model, processor = get_model_processor(
        str(tiny_model_dir), model_type="qwen3_vl", torch_dtype=torch.float32, download_model=False
    )
    assert type(model) is Qwen3VLForConditionalGeneration
    assert model.model_meta.model_type == "qwen3_vl"
    visual = model.model.visual
    assert type(visual.merger).__name__ == "Qwen3VLVisionPatchMerger"
    assert len(visual.deepstack_merger_list) == 2
    assert model.get_input_embeddings().weight.shape == (QWEN_VOCAB_SIZE, 64)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == IMAGE_PAD_ID
    assert 19_000_000 < sum(p.numel() for p in model.parameters()) < 21_000_000
