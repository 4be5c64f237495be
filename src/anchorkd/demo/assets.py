"""The embedded default's assets: the tiny Qwen3-VL checkpoint and the synthetic data, built once.

This is the one way demo assets are made, for ``anchorkd prepare-demo`` and for the testbed alike.
Both builders are deterministic and leave a stamp of what they were asked for in their folder
(``anchorkd_tiny.json``: seed and sizes; ``manifest.json``: generator version, seed and sizes). A folder
whose stamp matches the request is reused as is; one whose stamp differs is rebuilt. A folder without a
stamp is not ours: the builders refuse to write into it when it has content.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError
from ..io import read_json_object

DEFAULT_DEMO_ROOT = Path("outputs/demo")
TINY_MODEL_DIR = "tiny-qwen3-vl"
DATA_DIR = "data"
TINY_MODEL_STAMP = "anchorkd_tiny.json"


def prepare_demo_assets(
    root: str | Path = DEFAULT_DEMO_ROOT, seed: int = 0, quick: bool = False
) -> dict[str, Path]:
    """Build (or reuse) ``root/tiny-qwen3-vl`` and ``root/data``; return their resolved paths.

    ``quick`` selects the tiny data sizes (``SyntheticSizes.quick()``) used by tests.
    """
    from .synthetic import GENERATOR_VERSION, MANIFEST_FILE, SyntheticSizes, make_synthetic_data
    from .tiny_model import TinyQwen3VLSizes, make_tiny_model

    root = Path(root)
    model_dir = root / TINY_MODEL_DIR
    data_dir = root / DATA_DIR

    model_sizes = TinyQwen3VLSizes()
    model_stamp = {"seed": seed, "sizes": asdict(model_sizes)}
    model_state = _stamp_state(model_dir / TINY_MODEL_STAMP, model_stamp)
    if model_state == "stale":
        shutil.rmtree(model_dir)
    if model_state != "current":
        make_tiny_model(model_dir, seed=seed, sizes=model_sizes)

    data_sizes = SyntheticSizes.quick() if quick else SyntheticSizes()
    data_stamp = {"generator": GENERATOR_VERSION, "seed": seed, "sizes": asdict(data_sizes)}
    data_state = _stamp_state(data_dir / MANIFEST_FILE, data_stamp)
    if data_state != "current":
        # A stale data set is swapped for the new one in one rename (make_synthetic_data's overwrite).
        make_synthetic_data(data_dir, seed=seed, sizes=data_sizes, overwrite=data_state == "stale")
    return {"model": model_dir.resolve(), "data": data_dir.resolve()}


def _stamp_state(stamp: Path, expected: Mapping[str, Any]) -> Literal["current", "stale", "absent"]:
    """``current`` when the stamp records every ``expected`` value, ``stale`` when it differs or cannot
    be read, ``absent`` when there is none (then the folder is not one of our builds)."""
    if not stamp.is_file():
        return "absent"
    try:
        recorded = read_json_object(stamp)
    except DataError:
        return "stale"
    # Compared as JSON, so that tuples in ``expected`` equal the lists the stamp holds.
    wanted = json.loads(json.dumps(expected))
    return "current" if all(recorded.get(key) == value for key, value in wanted.items()) else "stale"
