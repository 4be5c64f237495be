"""The embedded default's assets: the tiny Qwen3-VL checkpoint and the synthetic data, built once.

Both builders are deterministic, so an existing folder with a matching stamp is reused as is.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

DEFAULT_DEMO_ROOT = Path("outputs/demo")
TINY_MODEL_DIR = "tiny-qwen3-vl"
DATA_DIR = "data"


def prepare_demo_assets(
    root: str | Path = DEFAULT_DEMO_ROOT, seed: int = 0, quick: bool = False
) -> dict[str, Path]:
    """Build (or reuse) ``root/tiny-qwen3-vl`` and ``root/data``; return their paths."""
    from .synthetic import MANIFEST_FILE, SyntheticSizes, make_synthetic_data
    from .tiny_model import make_tiny_model

    root = Path(root)
    model_dir = root / TINY_MODEL_DIR
    data_dir = root / DATA_DIR
    if not (model_dir / "anchorkd_tiny.json").is_file():
        make_tiny_model(model_dir, seed=seed)
    sizes = SyntheticSizes.quick() if quick else SyntheticSizes()
    manifest = data_dir / MANIFEST_FILE
    if not manifest.is_file() or not _same_data(manifest, seed, sizes):
        make_synthetic_data(data_dir, seed=seed, sizes=sizes, overwrite=True)
    return {"model": model_dir.resolve(), "data": data_dir.resolve()}


def _same_data(manifest: Path, seed: int, sizes) -> bool:
    recorded = json.loads(manifest.read_text())
    return recorded.get("seed") == seed and recorded.get("sizes") == asdict(sizes)
