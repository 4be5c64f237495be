"""Files shipped inside the package: the recipe configs, the default lexicon and the anchor-set defaults.

They are package data (``src/anchorkd/configs``), so an installed wheel has them too; the checkout's
top-level ``configs`` is a link to the same folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped_configs_dir() -> Path:
    """The folder of shipped configs (stage configs, recipes, demo, testbed, lexicons)."""
    # setuptools installs package data as plain files, never zipped, so a Path is always available.
    return Path(str(files("anchorkd") / "configs"))


def default_lexicon_path() -> Path:
    return shipped_configs_dir() / "lexicons" / "telecom_default.yaml"


def anchor_defaults_dir() -> Path:
    """The default general prompts and text questions of ``anchorkd anchors build``."""
    return Path(str(files("anchorkd") / "data" / "anchor_defaults"))


def default_general_prompts_path() -> Path:
    return anchor_defaults_dir() / "general_prompts.txt"


def default_text_questions_path() -> Path:
    return anchor_defaults_dir() / "text_questions.txt"
