"""Object lexicon: which words in a caption name which object.

Every hallucination metric (CHAIR, object recall, OOD domain-object rate) reduces a caption to the set
of objects it names, so all of them share one vocabulary, kept in a YAML file rather than in code so
that it can be reviewed and extended without touching the metrics.

Lexicon file format (see ``configs/lexicons/telecom_default.yaml``)::

    version: 1
    objects:
      patch_panel:                  # canonical name: lower-case snake_case, as in ground truth
        synonyms: [patch panel, patch panels, patchpanel]
        domain: true                # object of the fine-tuning domain (indoor equipment room)
        description: optional free text
    ignored_phrases: [server room, equipment room]   # optional: compounds that name no object

Rules, enforced when loading (pydantic, unknown keys rejected; every error names the file and the key
path, e.g. ``telecom_default.yaml: objects.rack.synonyms.2: ...``):

* canonical names match ``[a-z][a-z0-9_]*``; the canonical name is itself always a synonym;
* synonyms are matched case-insensitively, and ``_``, ``-`` and runs of whitespace are interchangeable
  ("patch_panel" == "Patch-Panel" == "patch  panel"), so dense-caption lines such as
  ``patch_panel: [10, 20, 300, 400]`` are recognised by their ``name:`` prefix like any other mention;
* a synonym (after that normalisation) may belong to one object only -- otherwise a mention would be
  credited to an arbitrary object;
* plurals are not generated: list them, because English plurals of technical nouns ("antennae",
  "bbus") are not reliably rule-based;
* ``ignored_phrases`` are compounds that contain an object word but name something else ("server
  room" is a room, not a server). They are matched like synonyms, so they win over the shorter object
  word inside them, and then produce no mention. They may not also be synonyms.

Matching is on word boundaries (letters and digits; ``_`` counts as a space) and takes the longest
synonym at each position, so "patch panels" is one ``patch_panel`` mention and not also a shorter one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    model_validator,
)

from anchorkd.data.dense_caption import normalize_phrase
from anchorkd.errors import LexiconError
from anchorkd.resources import default_lexicon_path

DEFAULT_LEXICON_PATH = default_lexicon_path()
"""The telecom lexicon shipped with the package."""

_WORD_CHAR = "[a-z0-9]"

CanonicalName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]
# A synonym must contain a letter or digit, otherwise it would match punctuation or nothing at all.
Synonym = Annotated[str, StringConstraints(pattern=r"[A-Za-z0-9]")]


class LexiconObject(BaseModel):
    """One object of the lexicon as written in the YAML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    synonyms: list[Synonym] = Field(min_length=1)
    domain: StrictBool
    description: str | None = None


class LexiconSpec(BaseModel):
    """The whole lexicon file: a format version and the objects by canonical name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(default=1, ge=1, le=1)
    objects: dict[CanonicalName, LexiconObject] = Field(min_length=1)
    ignored_phrases: list[Synonym] = Field(default_factory=list)

    @model_validator(mode="after")
    def _each_phrase_has_one_owner(self) -> LexiconSpec:
        owner_by_phrase: dict[str, str] = {}
        for name, spec in self.objects.items():
            own_phrases = {normalize_phrase(name)} | {normalize_phrase(s) for s in spec.synonyms}
            for phrase in sorted(own_phrases):
                previous_owner = owner_by_phrase.setdefault(phrase, name)
                if previous_owner != name:
                    raise ValueError(
                        f"objects.{name}.synonyms: {phrase!r} is already claimed by objects.{previous_owner}"
                    )
        for index, phrase in enumerate(self.ignored_phrases):
            owner = owner_by_phrase.get(normalize_phrase(phrase))
            if owner is not None:
                raise ValueError(f"ignored_phrases.{index}: {phrase!r} is a synonym of objects.{owner}")
        return self


@dataclass(frozen=True)
class Mention:
    """A lexicon object named in a text: its canonical name and where (``text[start:end]``)."""

    object: str
    span: tuple[int, int]
    surface: str


class Lexicon:
    """A validated object vocabulary that finds object mentions in captions."""

    def __init__(self, spec: LexiconSpec, source: str = "<lexicon>") -> None:
        self.spec = spec
        self.source = source
        # Ignored phrases map to None: they are matched (and so shadow the object words inside them)
        # but yield no mention.
        self._object_by_phrase: dict[str, str | None] = {
            normalize_phrase(p): None for p in spec.ignored_phrases
        }
        for name, obj in spec.objects.items():
            for phrase in [name, *obj.synonyms]:
                self._object_by_phrase[normalize_phrase(phrase)] = name
        # Longest phrase first: the regex alternation takes the first alternative that matches at a
        # position, so this makes "patch panel" win over any shorter synonym starting at the same word.
        phrases = sorted(self._object_by_phrase, key=lambda p: (-len(p), p))
        alternatives = "|".join(r"[\s_\-]+".join(map(re.escape, p.split(" "))) for p in phrases)
        self._pattern = re.compile(rf"(?<!{_WORD_CHAR})(?:{alternatives})(?!{_WORD_CHAR})", re.IGNORECASE)

    @property
    def objects(self) -> frozenset[str]:
        """Canonical names of all objects."""
        return frozenset(self.spec.objects)

    @property
    def domain_objects(self) -> frozenset[str]:
        """Canonical names of the fine-tuning domain's objects (``domain: true``)."""
        return frozenset(name for name, obj in self.spec.objects.items() if obj.domain)

    def canonicalize(self, name: str) -> str | None:
        """Map a whole phrase ("Patch Panels", "patch_panel") to its canonical name, or None if unknown."""
        return self._object_by_phrase.get(normalize_phrase(name))

    def find_mentions(self, text: str) -> list[Mention]:
        """Every object mention in ``text``, in order of appearance (repeats included)."""
        mentions = []
        for match in self._pattern.finditer(text):
            name = self._object_by_phrase[normalize_phrase(match.group(0))]
            if name is not None:
                mentions.append(Mention(object=name, span=match.span(), surface=match.group(0)))
        return mentions

    def mentioned_objects(self, text: str) -> set[str]:
        """Canonical names of the objects ``text`` names, each once."""
        return {mention.object for mention in self.find_mentions(text)}

    def canonicalize_all(self, names: Iterable[str]) -> tuple[set[str], list[str]]:
        """Canonicalise ground-truth names; returns (known canonical names, names not in the lexicon)."""
        known: set[str] = set()
        unknown: list[str] = []
        for name in names:
            canonical = self.canonicalize(name)
            if canonical is None:
                unknown.append(name)
            else:
                known.add(canonical)
        return known, unknown


def _format_location(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in loc)


def lexicon_from_mapping(data: object, source: str = "<mapping>") -> Lexicon:
    """Validate an already-parsed lexicon document; errors are :class:`LexiconError` naming ``source``."""
    try:
        spec = LexiconSpec.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            location = _format_location(item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            problems.append(f"{source}: {location + ': ' if location else ''}{message}")
        raise LexiconError("invalid lexicon\n  " + "\n  ".join(problems)) from None
    return Lexicon(spec, source=source)


def load_lexicon(path: str | Path | None = None) -> Lexicon:
    """Load and validate a lexicon YAML file (default: the shipped telecom lexicon)."""
    path = Path(path) if path is not None else DEFAULT_LEXICON_PATH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise LexiconError(f"{path}: cannot read lexicon: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise LexiconError(f"{path}: not valid YAML: {error}") from error
    return lexicon_from_mapping(data, source=str(path))
