"""The dense-caption format: one ``- name: [x1, y1, x2, y2]`` line per object; its writer and its parser.

The synthetic data set writes captions with :func:`dense_caption`, and the evaluation reads model
output with :func:`parse_dense_caption`, so what is trained and what is scored share one grammar. The
writer emits the canonical form; the parser also accepts what models typically get slightly wrong
(see :func:`parse_dense_caption`), and keeps every other non-blank line as malformed, so a model that
breaks the format is counted, not silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Box = tuple[float, float, float, float]

_SEPARATORS = re.compile(r"[\s_\-]+")
_DENSE_LINE = re.compile(
    r"""^\s*(?:[-*\u2022]\s+|\d+[.)]\s+)?        # optional bullet or list number
        (?P<name>[^:\[\]()]*?[A-Za-z][^:\[\]()]*?)  # object name (must contain a letter)
        \s*:?\s*[\[(](?P<coords>[^\[\]()]*)[\])]    # [x1, y1, x2, y2] or (x1, y1, x2, y2)
        \s*[,;.]?\s*$""",
    re.VERBOSE,
)
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_SKIPPED_LINE = re.compile(r"^\s*(?:```\w*)?\s*$")  # blank lines and markdown code fences carry no field


def normalize_phrase(text: str) -> str:
    """Lower-case ``text`` and make ``_``, ``-`` and whitespace runs a single space.

    This is the form in which object names are compared, so "Patch_Panel" and "patch panel" are equal.
    """
    return _SEPARATORS.sub(" ", text.strip().lower()).strip()


@dataclass(frozen=True)
class DenseField:
    """One object of a dense caption: canonical name and box (x1 <= x2, y1 <= y2)."""

    name: str
    box: Box


@dataclass(frozen=True)
class DenseCaption:
    """A parsed dense caption: the well-formed fields and the lines that were not."""

    fields: tuple[DenseField, ...]
    malformed_lines: tuple[str, ...]


def ordered_box(coords: Sequence[float]) -> Box:
    """``[x1, y1, x2, y2]`` with the corners swapped where needed, so that x1 <= x2 and y1 <= y2."""
    x1, y1, x2, y2 = coords
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def field_name(raw_name: str, canonicalize: Callable[[str], str | None] | None = None) -> str:
    """The canonical name of a written object name: ``canonicalize``'s answer, else snake_case."""
    canonical = canonicalize(raw_name) if canonicalize is not None else None
    return canonical if canonical is not None else normalize_phrase(raw_name).replace(" ", "_")


def dense_caption(objects: Iterable[Mapping[str, Any]], words: Mapping[str, str] | None = None) -> str:
    """One ``- word: [x1, y1, x2, y2]`` line per ``{"name", "box"}`` object, in the order given.

    ``words`` maps an object name to the word written for it (default: the name itself); the parser
    reads the word back as the name in snake_case ("patch panel" -> ``patch_panel``, "BBU" -> ``bbu``).
    """
    lines = []
    for obj in objects:
        word = words[obj["name"]] if words is not None else obj["name"]
        lines.append(f"- {word}: [{', '.join(str(v) for v in obj['box'])}]")
    return "\n".join(lines)


def parse_dense_caption(text: str, canonicalize: Callable[[str], str | None] | None = None) -> DenseCaption:
    """Parse ``name: [x1, y1, x2, y2]`` lines, tolerating what models typically get slightly wrong.

    Accepted: bullets / list numbers, spaces or ``-`` instead of ``_`` in the name, a missing colon,
    round brackets, float coordinates, commas and/or spaces between numbers, a trailing punctuation
    mark, swapped corners (reordered). Blank lines and markdown code fences are ignored. Anything else
    (wrong number of coordinates, no box, non-numeric values) is kept as a malformed line.
    ``canonicalize`` (e.g. ``Lexicon.canonicalize``) maps synonyms to canonical names; names it does
    not know are kept in snake_case.
    """
    fields: list[DenseField] = []
    malformed: list[str] = []
    for line in text.splitlines():
        if _SKIPPED_LINE.match(line):
            continue
        match = _DENSE_LINE.match(line)
        coords = [c for c in re.split(r"[\s,]+", match.group("coords").strip()) if c] if match else []
        if match is None or len(coords) != 4 or not all(_NUMBER.match(c) for c in coords):
            malformed.append(line.strip())
            continue
        box = ordered_box([float(c) for c in coords])
        fields.append(DenseField(name=field_name(match.group("name"), canonicalize), box=box))
    return DenseCaption(fields=tuple(fields), malformed_lines=tuple(malformed))
