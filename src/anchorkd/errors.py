"""Errors raised for bad configuration or bad input data: one hierarchy under :class:`AnchorKDError`.

Every error names where the problem is (a config key path such as ``rlhf.llm_kd_weight``, or a
``file:line``) and the rule that was broken, so a user can fix it without reading our code. The
command line turns any :class:`AnchorKDError` into its message and exit status 2, without a traceback.
"""

from __future__ import annotations


class AnchorKDError(Exception):
    """Base of every error anchorkd raises for input a user can fix (config, data, files)."""


class ConfigError(AnchorKDError, ValueError):
    """A configuration value breaks a rule. ``key_path`` is the dotted path of the offending key."""

    def __init__(self, key_path: str, message: str, source: str | None = None):
        self.key_path = key_path
        self.rule = message
        self.source = source
        where = f"{key_path}" + (f" (in {source})" if source else "")
        super().__init__(f"{where}: {message}")


class ConfigErrors(ConfigError):
    """Several configuration errors found in one pass, reported together."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        first = errors[0]
        super().__init__(first.key_path, first.rule, first.source)
        self.args = ("\n".join(str(e) for e in errors),)

    def __str__(self) -> str:
        return self.args[0]


class DataError(AnchorKDError, ValueError):
    """A data file, one of its lines, or a file it references is unusable."""

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = path
        self.line = line
        location = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{location}: {message}")


class TelemetryFormatError(DataError):
    """A line of a training log (``logging.jsonl``) could not be understood."""


class LexiconError(AnchorKDError, ValueError):
    """A lexicon file is unreadable or invalid; the message names the file and the key path."""
