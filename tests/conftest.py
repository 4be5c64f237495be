"""Shared fixtures: one tiny checkpoint and one synthetic data set per test session.

Building them takes seconds, loading ms-swift takes more; every test reuses the same ones. Tests run
offline: the environment is set before transformers or ms-swift can be imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from anchorkd.offline import configure_network

configure_network()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def media_cache_in_the_session(tmp_path_factory):
    """Keep the decoded-image cache (data/media.py) out of the user's ~/.cache: one file per test session."""
    saved = os.environ.get("ANCHORKD_MEDIA_CACHE")
    os.environ["ANCHORKD_MEDIA_CACHE"] = str(tmp_path_factory.mktemp("media-cache") / "media-verified.txt")
    yield
    if saved is None:
        os.environ.pop("ANCHORKD_MEDIA_CACHE", None)
    else:
        os.environ["ANCHORKD_MEDIA_CACHE"] = saved


REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = REPO_ROOT / "configs"


@pytest.fixture(autouse=True)
def clean_tb_env():
    """ms-swift's argument constructors export TENSORBOARD_LOGGING_DIR (only when unset): keep one test's
    value from leaking into the next."""
    saved = os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
    yield
    if saved is None:
        os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
    else:
        os.environ["TENSORBOARD_LOGGING_DIR"] = saved


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from anchorkd.demo.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl", seed=0)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    from anchorkd.demo.synthetic import SyntheticSizes, make_synthetic_data

    out = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic_data(out, seed=0, sizes=SyntheticSizes.quick())
    return out


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory, tiny_model_dir, synthetic_data_dir) -> Path:
    """A working directory laid out like the repository after `anchorkd prepare-demo`."""
    work = tmp_path_factory.mktemp("demo-workdir")
    demo = work / "outputs" / "demo"
    demo.mkdir(parents=True)
    (demo / "tiny-qwen3-vl").symlink_to(tiny_model_dir, target_is_directory=True)
    (demo / "data").symlink_to(synthetic_data_dir, target_is_directory=True)
    return work


@pytest.fixture
def in_demo_workdir(demo_workdir, monkeypatch) -> Path:
    """Run the test from the demo working directory, so configs/demo/*.yaml resolve their paths."""
    monkeypatch.chdir(demo_workdir)
    return demo_workdir


def _quick_run_overrides(output_dir: Path, steps: int = 3, batch: int = 2) -> list[str]:
    return [
        f"training.output_dir={output_dir}",
        f"training.max_steps={steps}",
        f"training.per_device_train_batch_size={batch}",
        f"training.save_steps={steps}",
        "training.eval_strategy=no",
        "training.add_version=false",
    ]


@pytest.fixture(scope="session")
def quick_overrides():
    """``quick_overrides(output_dir, steps=3, batch=2)``: overrides that make a shipped demo config run a
    few steps in a test, with no eval pass, one checkpoint at the end, into the test's own output dir."""
    return _quick_run_overrides
