"""What the scorers read off a prompt: noun phrases, object nouns, the prompt without adjectives.

T2I-CompBench's scripts parse prompts with spaCy's ``en_core_web_sm``: BLIP-VQA asks about each of
``doc.noun_chunks``, the spatial script takes the first and last ``NOUN`` token (or, for complex prompts,
the nouns either side of a spatial preposition), and the complex CLIPScore drops ``ADJ`` tokens. Two parsers
give those three readings: ``SpacyPhraseParser`` (the official one; needs ``spacy`` and its
``en_core_web_sm`` model) and ``RulePhraseParser`` (no model: the pipeline's ``PromptPhraseCaptioner``
phrases, their last words as nouns, and a closed list of attribute words as adjectives).
"""

from __future__ import annotations

import re
from typing import Protocol

from ..errors import UsageError
from ..pipeline_realign_diff import PromptPhraseCaptioner
from .options import PHRASE_PARSERS

# The prepositions around which the official script finds a complex prompt's two objects, in its order.
COMPLEX_PREPOSITIONS: tuple[str, ...] = (
    "on top of",
    "on bottom of",
    "on the left",
    "on the right",
    "next to",
    "on side of",
    "near",
)
# Attribute words of T2I-CompBench's prompts beyond the captioner's list (textures, shapes, materials).
EXTRA_ADJECTIVES = frozenset(
    "rough smooth fuzzy bumpy sharp prickly sleek glossy matte metallic wooden hardcover spiky jagged striped "
    "translucent opaque iridescent golden silky velvet cozy crisp crunchy juicy sweet sour tart spicy slimy "
    "fragrant delicate gentle vibrant colorful multicolored dull dusty rusty rusted shimmering plush glowing "
    "flickering fluffy bulky lumpy damp thick thin dark dim deep calm choppy tender sticky greasy crispy "
    "textured cracked peeling rounded conical pentagonal triangular cylindrical spherical angular curved "
    "straight elegant plain rocky rich busy quiet distant cool cold warm hot tired grey gray".split()
)


class PhraseParser(Protocol):
    """The three readings of a prompt the scorers need."""

    name: str

    def noun_phrases(self, prompt: str) -> list[str]: ...

    def nouns(self, prompt: str) -> list[str]: ...

    def complex_objects(self, prompt: str) -> tuple[str, str] | None: ...

    def without_adjectives(self, prompt: str) -> str: ...


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+|[^\w\s]", text)


class RulePhraseParser:
    """No-model parsing: noun phrases from ``PromptPhraseCaptioner``, each phrase's last word its noun."""

    name = "rule"

    def __init__(self) -> None:
        self.captioner = PromptPhraseCaptioner()
        self.adjectives = frozenset(self.captioner.attribute_words) | EXTRA_ADJECTIVES

    def noun_phrases(self, prompt: str) -> list[str]:
        """The prompt's object phrases: ``"a green bench and a blue bowl"`` gives both phrases."""
        return self.captioner.phrases(prompt)

    def nouns(self, prompt: str) -> list[str]:
        """Each noun phrase's head noun (its last word), lower case, in prompt order."""
        return [_words(phrase)[-1].lower() for phrase in self.noun_phrases(prompt) if _words(phrase)]

    def complex_objects(self, prompt: str) -> tuple[str, str] | None:
        """The nouns just before and just after the first of ``COMPLEX_PREPOSITIONS``, or ``None``."""
        lowered = prompt.lower()
        found = [(lowered.find(p), p) for p in COMPLEX_PREPOSITIONS if re.search(rf"\b{re.escape(p)}\b", lowered)]
        if not found:
            return None
        start, preposition = min((re.search(rf"\b{re.escape(p)}\b", lowered).start(), p) for _, p in found)
        end = start + len(preposition)
        before, after, cursor = None, None, 0
        for phrase in self.noun_phrases(prompt):
            position = lowered.find(phrase.lower(), cursor)
            if position < 0:
                continue
            cursor = position + len(phrase)
            noun = _words(phrase)[-1].lower()
            if cursor <= start:
                before = noun
            elif position >= end and after is None:
                after = noun
        return (before, after) if before and after else None

    def without_adjectives(self, prompt: str) -> str:
        """The prompt's words, attribute words left out, joined by single spaces (as the official script joins
        spaCy tokens)."""
        return " ".join(word for word in _words(prompt) if word.lower() not in self.adjectives)


class SpacyPhraseParser:
    """The official parsing, through spaCy (``pip install spacy``, ``python -m spacy download en_core_web_sm``)."""

    name = "spacy"

    def __init__(self, model: str = "en_core_web_sm") -> None:
        advice = (
            "--phrase-parser spacy needs spaCy and its English model: `pip install spacy && python -m spacy "
            f"download {model}`; or use --phrase-parser rule"
        )
        try:
            import spacy
        except ImportError:
            raise UsageError(f"{advice} (spaCy is not installed)") from None
        try:
            self.nlp = spacy.load(model)
        except OSError:
            raise UsageError(f"{advice} (no spaCy model {model!r})") from None

    def noun_phrases(self, prompt: str) -> list[str]:
        return [chunk.text for chunk in self.nlp(prompt).noun_chunks]

    def nouns(self, prompt: str) -> list[str]:
        return [token.text for token in self.nlp(prompt) if token.pos_ == "NOUN"]

    def complex_objects(self, prompt: str) -> tuple[str, str] | None:
        """The official complex rule: the nearest NOUN (or PROPN) before a preposition and the first NOUN after
        it (a PROPN if no NOUN follows); both found at most once per preposition, kept only if exactly two."""
        doc = self.nlp(prompt)
        objects: list[str] = []
        for i in range(len(doc)):
            width = next((k for k in (3, 2, 1) if doc[i : i + k].text in COMPLEX_PREPOSITIONS), None)
            if width is None:
                continue
            for j in range(i - 1, -1, -1):
                if doc[j].pos_ in ("NOUN", "PROPN"):
                    objects.append(doc[j].text)
                    break
            following = [doc[j] for j in range(i + width, len(doc))]
            noun = next((t.text for t in following if t.pos_ == "NOUN"), None)
            if noun is None:
                noun = next(
                    (t.text for t, n in zip(following, following[1:]) if t.pos_ == "PROPN" and n.pos_ != "PROPN"),
                    None,
                )
            if noun is not None:
                objects.append(noun)
        return (objects[0], objects[1]) if len(objects) == 2 else None

    def without_adjectives(self, prompt: str) -> str:
        return " ".join(token.text for token in self.nlp(prompt) if token.pos_ != "ADJ")


def load_phrase_parser(name: str) -> PhraseParser:
    """``"rule"`` or ``"spacy"``."""
    if name == "rule":
        return RulePhraseParser()
    if name == "spacy":
        return SpacyPhraseParser()
    raise ValueError(f"phrase parser must be one of {PHRASE_PARSERS}, got {name!r}")
