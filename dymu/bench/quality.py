"""Answer quality for `dymu bench`: does merging tokens change what the model says?

Two measures, both offline:

* MMBench (VLMEvalKit's MMBench DEV EN): a rule-based option-letter extractor (no judge model) and
  accuracy overall, per category and per L2 category, plus MMBench's circular score when the
  rotated copies of a question are present (a question counts only if every rotation is right).
* COCO captions: BLEU-1..4, ROUGE-L and CIDEr from the `pycocoevalcap` scorers (the optional
  dependency `dymu[eval]`).

Tokenizer caveat: the reference COCO pipeline first runs the Stanford PTB tokenizer, which needs
Java. We use `simple_tokenize` instead (lowercase, punctuation stripped, whitespace split), so our
numbers are close to, but not identical with, published COCO numbers; compare stock vs DyMU with
the same tokenizer, not our numbers with a paper's.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from ..errors import DymuError

# ---------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------

CIRCULAR_STRIDE = 1_000_000  # MMBench's rotated copies of question i have index i + k * 1_000_000

_MARKDOWN = re.compile(r"[*`]+")
# the whole answer is one letter: "B", "B.", "B)", "B:", "(B)", "[B]"
_WHOLE = re.compile(r"^(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)]?)$")
# the answer starts with a marked letter: "(B) ...", "[B] ...", "B. ...", "B) ...", "B: ..."
_LEADING = re.compile(r"^(?:\(([A-Z])\)|\[([A-Z])\])(?![A-Za-z0-9])|^([A-Z])[.:)](?=\s|$)")
# "answer is B", "Answer: B", "the correct option is (C)", "choice D" (keywords any case, letter capital)
_PHRASE = re.compile(
    r"(?i:\b(answer|option|choice)\b)"
    r"(\s+(?i:is|would\s+be|should\s+be|will\s+be)\b)?"
    r"\s*[:=-]?\s*(?i:(?:option|choice)\s+)?"
    r"(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])(?![A-Za-z0-9]))"
)
# a parenthesised capital anywhere: "... so it is (B)."
_PAREN = re.compile(r"\(([A-Z])\)")
# "A or B", "A, B", "A/B", "A and B" right after a found letter: the model named more than one
_ALTERNATIVE = re.compile(r"\s*(?:,|/|\bor\b|\band\b)\s*(?:\(|\[)?([A-Z])(?![A-Za-z0-9])")
# after "Answer:" a capital "A"/"I" followed by a lowercase word is usually an article or a pronoun
# ("Answer: A cat is sitting"); these words after it still mark it as the letter
_LETTER_CONTINUATIONS = {"is", "because", "since", "as", "was", "seems", "fits", "matches", "would", "should"}
_NON_WORD = re.compile(r"[\W_]+")


def _first_group(match: re.Match[str], groups: Iterable[int]) -> str | None:
    return next((match.group(i) for i in groups if match.group(i)), None)


def _normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, single spaces: "A red apple." -> "a red apple"."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _looks_like_article(letter: str, rest: str) -> bool:
    """True for "A cat ..." / "I think ...": a capital that starts a sentence, not an option letter."""
    if letter not in ("A", "I"):
        return False
    word = re.match(r"\s+([a-z]+)", rest)
    return bool(word) and word.group(1) not in _LETTER_CONTINUATIONS


def _letters_named(text: str) -> set[str]:
    """Every capital letter the answer marks as its choice (the patterns above; order does not matter)."""
    found: set[str] = set()

    def add_with_alternatives(letter: str, end: int) -> None:
        found.add(letter)
        while more := _ALTERNATIVE.match(text, end):
            found.add(more.group(1))
            end = more.end()

    first_line = text.splitlines()[0].strip()
    if whole := _WHOLE.match(first_line):
        found.add(_first_group(whole, (1, 2, 3)))
    if leading := _LEADING.match(text):
        add_with_alternatives(_first_group(leading, (1, 2, 3)), leading.end())
    for phrase in _PHRASE.finditer(text):
        bracketed = _first_group(phrase, (3, 4))
        if bracketed:
            add_with_alternatives(bracketed, phrase.end())
            continue
        letter = phrase.group(5)
        # after "is"/"would be" or "option"/"choice" a capital is a letter; after "Answer:" it may start a sentence
        sentence_start = phrase.group(2) is None and phrase.group(1).lower() == "answer"
        if not (sentence_start and _looks_like_article(letter, text[phrase.end() :])):
            add_with_alternatives(letter, phrase.end())
    for paren in _PAREN.finditer(text):
        found.add(paren.group(1))
    return found


def _match_option_text(prediction: str, texts: Mapping[str, str]) -> str | None:
    """The one option whose text the answer gives: an exact match first, then whole-word containment."""
    said = _normalize(prediction)
    if not said:
        return None
    exact = [letter for letter, text in texts.items() if text == said]
    if exact:
        return exact[0] if len(exact) == 1 else None
    padded = f" {said} "
    contained = {letter: text for letter, text in texts.items() if f" {text} " in padded}
    # "red apple" contains "apple": keep only the longest of nested matches
    kept = [
        letter
        for letter, text in contained.items()
        if not any(text != other and f" {text} " in f" {other} " for other in contained.values())
    ]
    return kept[0] if len(kept) == 1 else None


def extract_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer picks, or None if it names none or several.

    Offline and deterministic, so the score does not depend on a judge model. Letters count only
    as a whole answer ("B", "(B)", lowercase "b") or in marked forms ("B." / "B)" at the start,
    "answer is B", "Answer: B", "(B)"), so the article in "A cat is sitting" is not read as "A".
    Failing a letter, an answer that repeats exactly one option's text (case and punctuation
    ignored; an exact match wins over containment) picks that option.
    """
    texts = {
        str(letter).strip().upper(): _normalize(text)
        for letter, text in options.items()
        if isinstance(text, str) and _normalize(text)  # a NaN/empty option (pandas rows) is no option
    }
    if not isinstance(prediction, str):  # a missing answer (None, a pandas NaN)
        return None
    text = _MARKDOWN.sub("", prediction).strip()
    if not text or not texts:
        return None
    if re.fullmatch(r"[a-z]", text):  # a bare lowercase letter is unambiguous
        text = text.upper()
    named = _letters_named(text)
    valid = named & texts.keys()
    if len(valid) == 1:
        return valid.pop()
    if len(valid) > 1:
        return None
    return _match_option_text(text, texts)


def _fraction(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def _by_key(pairs: Iterable[tuple[str | None, bool]]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for key, hit in pairs:
        if key is not None:
            groups[key].append(hit)
    return {key: sum(hits) / len(hits) for key, hits in sorted(groups.items())}


def mmbench_accuracy(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MMBench accuracy (fractions in [0, 1]) overall, per category and L2 category, and circular.

    Each record: `index`, `prediction`, `answer` (letter), `options` (letter -> text), `category`,
    `l2_category`. Circular evaluation (compute only when some question has rotated copies): the
    copies share `index % 1_000_000`, and a question counts as right only if every copy is right.
    """
    hits: list[bool] = []
    unmatched = 0
    for record in records:
        picked = extract_option(record["prediction"], record["options"])
        unmatched += picked is None
        hits.append(picked is not None and picked == str(record["answer"]).strip().upper())

    groups: dict[int, list[int]] = defaultdict(list)  # question -> positions of its copies
    for position, record in enumerate(records):
        groups[int(record["index"]) % CIRCULAR_STRIDE].append(position)
    circular = None
    if any(len(members) > 1 for members in groups.values()):
        outcomes = []
        for members in groups.values():
            original = min(members, key=lambda p: int(records[p]["index"]))  # index < 1_000_000
            outcomes.append((records[original].get("category"), all(hits[p] for p in members)))
        circular = {
            "groups": len(outcomes),
            "overall": _fraction([hit for _, hit in outcomes]),
            "per_category": _by_key(outcomes),
        }

    return {
        "n": len(records),
        "overall": _fraction(hits),
        "per_category": _by_key((r.get("category"), hit) for r, hit in zip(records, hits, strict=True)),
        "per_l2_category": _by_key((r.get("l2_category"), hit) for r, hit in zip(records, hits, strict=True)),
        "unmatched": unmatched,
        "circular": circular,
    }


# ---------------------------------------------------------------------------------------------
# COCO captions
# ---------------------------------------------------------------------------------------------

TOKENIZER_NOTE = "simple (lowercase, punctuation stripped; not the Java PTB tokenizer)"

_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_PUNCTUATION = re.compile(r"(?<!\d)[.,]|[.,](?!\d)|[^\w\s.,-]|_")  # keeps "3.5" and "1,000"
_LONE_HYPHENS = re.compile(r"(?<!\w)-+|-+(?!\w)")  # keeps "black-and-white"


def simple_tokenize(text: str) -> str:
    """A stand-in for COCO's Java PTB step: lowercase, strip punctuation, single spaces.

    Apostrophes are deleted ("dog's" -> "dogs", PTB gives "dog 's"); other punctuation
    (.,!?;:"()[]{} and the like) becomes a space, except a period or comma inside a number and a
    hyphen inside a word, which PTB keeps too.
    """
    text = _APOSTROPHES.sub("", text.lower())
    text = _PUNCTUATION.sub(" ", text)
    text = _LONE_HYPHENS.sub(" ", text)
    return " ".join(text.split())


def caption_metrics(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, Any]:
    """COCO caption scores (BLEU-1..4, ROUGE-L, CIDEr) of predictions against reference captions.

    Only ids in both mappings (and with at least one reference) are scored. CIDEr weighs n-grams by
    how rare they are across the scored images' references, so it is 0 for a single image and
    only comparable between runs scored on the same image set.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu  # noqa: PLC0415 - optional dependency
        from pycocoevalcap.cider.cider import Cider  # noqa: PLC0415 - optional dependency
        from pycocoevalcap.rouge.rouge import Rouge  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise DymuError("caption metrics need pycocoevalcap: pip install 'dymu[eval]'") from exc
    try:
        version = importlib.metadata.version("pycocoevalcap")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"

    ids = [key for key in predictions if key in references and len(references[key]) > 0]
    result: dict[str, Any] = dict.fromkeys(("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"))
    result.update(n=len(ids), tokenizer=TOKENIZER_NOTE, scorer=f"pycocoevalcap {version}")
    if not ids:
        return result
    res = {key: [simple_tokenize(str(predictions[key]))] for key in ids}
    gts = {key: [simple_tokenize(str(ref)) for ref in references[key]] for key in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    for order, score in enumerate(bleu, start=1):
        result[f"BLEU-{order}"] = float(score)
    result["ROUGE-L"] = float(rouge)
    result["CIDEr"] = float(cider)
    return result


def exact_match(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Share of predictions equal to one of their references after `_normalize` (case and
    punctuation ignored). Dependency-free, and the measure that fits short-answer data such as the
    tiny model's shapes task; on real captions it is near 0 and CIDEr is the one to read."""
    if not references:
        raise DymuError("exact match: no references to compare with")
    hits = [
        any(_normalize(predictions.get(k, "")) == _normalize(r) for r in refs)
        for k, refs in references.items()
    ]
    return sum(hits) / len(hits)
