"""Answer-quality metrics: the MMBench letter extractor and accuracy, and the COCO caption scores."""

from __future__ import annotations

import math
import sys

import pytest

from dymu import DymuError
from dymu.bench.quality import caption_metrics, extract_option, mmbench_accuracy, simple_tokenize

OPTIONS = {"A": "A green pear", "B": "A yellow banana", "C": "A red apple.", "D": "Two plums"}


# --- extract_option ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("[B]", "B"),
        ("  B  ", "B"),
        ("The answer is B.", "B"),
        ("the answer is: B", "B"),
        ("Answer: B", "B"),
        ("**B**", "B"),
        ("**Answer:** C", "C"),
        ("b", "B"),
        ("A", "A"),
        ("Answer: A", "A"),
        ("B. A yellow banana", "B"),
        ("(C) a red apple", "C"),
        ("D) two plums", "D"),
        ("B\nBecause a banana is yellow.", "B"),
        ("The correct option is (D).", "D"),
        ("Option A is correct.", "A"),
        ("The answer is A because the pear is green.", "A"),
    ],
)
def test_extract_option_reads_the_letter_forms_models_write(prediction: str, expected: str) -> None:
    assert extract_option(prediction, OPTIONS) == expected


@pytest.mark.parametrize(
    "prediction",
    [
        "a red apple",
        "A RED APPLE!",
        "A red apple.",
        "It looks like a red apple to me.",
        "The answer is a red apple",
    ],
)
def test_extract_option_matches_the_option_text_ignoring_case_and_punctuation(prediction: str) -> None:
    assert extract_option(prediction, OPTIONS) == "C"


@pytest.mark.parametrize(
    "prediction",
    [
        "A or B",
        "The answer is A or B.",
        "(A) and (B)",
        "Answer: B, C",
        "A cat is sitting",  # the article, not a letter, and no option text matches
        "Answer: A cat is sitting",
        "I don't know.",
        "",
        "E",  # not one of the options
        "b.",  # lowercase only counts as the whole answer
        "b is my guess",
        "a pear or a banana",  # no option text contained whole, and no letter
    ],
)
def test_extract_option_returns_none_when_no_single_option_is_named(prediction: str) -> None:
    assert extract_option(prediction, OPTIONS) is None


def test_extract_option_reads_a_leading_article_as_text_when_the_option_text_matches() -> None:
    options = {"A": "A cat is sitting.", "B": "A dog is running."}
    assert extract_option("A cat is sitting", options) == "A"
    assert extract_option("a dog is running!", options) == "B"


def test_extract_option_prefers_the_exact_text_match_and_the_longest_contained_option() -> None:
    options = {"A": "apple", "B": "red apple", "C": "pear"}
    assert extract_option("Apple.", options) == "A"  # exact beats being contained in "red apple"
    assert extract_option("It is a red apple", options) == "B"  # "apple" lies inside "red apple"


def test_extract_option_refuses_a_text_match_to_several_options() -> None:
    assert extract_option("red or green", {"A": "red", "B": "green"}) is None
    assert extract_option("red", {"A": "Red", "B": "red."}) is None  # two options, same text


def test_extract_option_ignores_letters_whose_option_is_missing() -> None:
    options = {"A": "x", "B": "y", "C": float("nan"), "D": ""}  # pandas rows carry NaN for absent options
    assert extract_option("C", options) is None
    assert extract_option("B", options) == "B"
    assert extract_option("A", {"A": "one", "B": "two", "C": "three"}) == "A"
    assert extract_option("D", {"A": "one", "B": "two", "C": "three"}) is None


def test_extract_option_treats_a_missing_prediction_as_no_answer() -> None:
    assert extract_option(None, OPTIONS) is None  # type: ignore[arg-type]
    assert extract_option(float("nan"), OPTIONS) is None  # type: ignore[arg-type]


# --- mmbench_accuracy ---------------------------------------------------------------------------


def _record(index: int, prediction: str, answer: str, category: str | None, l2: str | None) -> dict:
    return {"index": index, "prediction": prediction, "answer": answer, "options": OPTIONS,
            "category": category, "l2_category": l2}  # fmt: skip


def test_mmbench_accuracy_overall_per_category_and_unmatched() -> None:
    records = [
        _record(1, "A", "A", "ocr", "fine"),  # right
        _record(2, "The answer is C.", "B", "ocr", "fine"),  # wrong
        _record(3, "(C) a red apple", "C", "count", "coarse"),  # right
        _record(4, "I am not sure", "D", "count", "coarse"),  # unmatched, wrong
        _record(5, "a yellow banana", "B", "count", "coarse"),  # right, by text
        _record(6, "Two plums", "D", None, None),  # right; counts overall only
    ]
    result = mmbench_accuracy(records)
    assert result["n"] == 6
    assert result["overall"] == pytest.approx(4 / 6)  # records 1, 3, 5, 6
    assert result["per_category"] == pytest.approx({"count": 2 / 3, "ocr": 1 / 2})  # count: 3, 5 of 3, 4, 5
    assert result["per_l2_category"] == pytest.approx({"coarse": 2 / 3, "fine": 1 / 2})
    assert result["unmatched"] == 1
    assert result["circular"] is None  # no question has a rotated copy


def test_mmbench_accuracy_circular_needs_every_rotation_right() -> None:
    records = [
        # question 7: four rotations, all right
        _record(7, "A", "A", "ocr", "fine"),
        _record(1_000_007, "B", "B", "ocr", "fine"),
        _record(2_000_007, "C", "C", "ocr", "fine"),
        _record(3_000_007, "D", "D", "ocr", "fine"),
        # question 8: three rotations, the second one wrong
        _record(8, "B", "B", "count", "coarse"),
        _record(1_000_008, "A", "C", "count", "coarse"),
        _record(2_000_008, "D", "D", "count", "coarse"),
    ]
    result = mmbench_accuracy(records)
    assert result["overall"] == pytest.approx(6 / 7)  # per record: all but 1_000_008
    assert result["per_category"] == pytest.approx({"count": 2 / 3, "ocr": 1.0})
    circular = result["circular"]
    assert circular["groups"] == 2
    assert circular["overall"] == pytest.approx(1 / 2)  # question 7 right, question 8 not
    assert circular["per_category"] == pytest.approx({"count": 0.0, "ocr": 1.0})


def test_mmbench_accuracy_of_nothing_is_none() -> None:
    result = mmbench_accuracy([])
    assert result["n"] == 0 and result["overall"] is None and result["unmatched"] == 0
    assert result["per_category"] == {} and result["circular"] is None


# --- captions ---------------------------------------------------------------------------------


def test_simple_tokenize_lowercases_and_strips_punctuation() -> None:
    assert simple_tokenize("A man, riding a horse.") == "a man riding a horse"
    assert simple_tokenize('(Two) [dogs] {play}; "outside": yes! no?') == "two dogs play outside yes no"
    assert simple_tokenize("A dog's toy") == "a dogs toy"
    assert simple_tokenize("A black-and-white photo -- old") == "a black-and-white photo old"
    assert simple_tokenize("3.5 inches of snow.End") == "3.5 inches of snow end"
    assert simple_tokenize("  spaced\tout\n") == "spaced out"


@pytest.fixture
def coco() -> object:
    return pytest.importorskip("pycocoevalcap")


METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")


def test_caption_metrics_of_a_perfect_match(coco: object) -> None:
    predictions = {1: "A man riding a wave on a surfboard.", 2: "Two dogs playing in the snow"}
    references = {
        1: ["a man riding a wave on a surfboard", "someone surfing"],
        2: ["two dogs playing in the snow"],
    }
    result = caption_metrics(predictions, references)
    assert result["n"] == 2
    for order in range(1, 5):
        assert result[f"BLEU-{order}"] == pytest.approx(1.0)
    assert result["ROUGE-L"] == pytest.approx(1.0)
    # CIDEr: cosine 1 with the matching reference, 0 with "someone surfing"; x10, averaged over
    # references then images: (10 * (1 + 0) / 2 + 10 * 1) / 2 = 7.5
    assert result["CIDEr"] > 0
    assert result["CIDEr"] == pytest.approx(7.5)
    assert result["tokenizer"].startswith("simple")
    assert result["scorer"].startswith("pycocoevalcap ")


def test_caption_metrics_bleu_clips_counts_and_applies_the_brevity_penalty(coco: object) -> None:
    result = caption_metrics({1: "the the the cat"}, {1: ["the cat sat on the mat"]})
    # unigrams: "the" x3 clipped to its 2 in the reference, "cat" 1 -> precision 3/4;
    # bigrams: "the the" x2 (0 in the reference), "the cat" 1 -> precision 1/3;
    # brevity penalty: 4 words against 6 -> exp(1 - 6/4) = exp(-0.5)
    assert result["BLEU-1"] == pytest.approx(0.75 * math.exp(-0.5), rel=1e-6)
    assert result["BLEU-2"] == pytest.approx(math.sqrt(0.75 * (1 / 3)) * math.exp(-0.5), rel=1e-6)


def test_caption_metrics_rank_a_close_caption_above_a_wrong_one(coco: object) -> None:
    references = {
        1: ["a man riding a wave on top of a surfboard", "a surfer rides a large wave"],
        2: ["two dogs playing together in the snow", "a pair of dogs run through snow"],
        3: ["a plate of food with broccoli and rice", "a dinner plate with rice and vegetables"],
    }
    close = {
        1: "a man riding a wave on a surfboard",
        2: "two dogs playing in the snow",
        3: "a plate with rice and broccoli",
    }
    wrong = {
        1: "a red bus parked on the street",
        2: "a cat sleeping on a couch",
        3: "a man holding an umbrella",
    }
    good, bad = caption_metrics(close, references), caption_metrics(wrong, references)
    for metric in METRICS:
        assert good[metric] > bad[metric], metric


def test_caption_metrics_score_only_ids_in_both_with_references(coco: object) -> None:
    result = caption_metrics(
        {1: "two dogs playing in the snow", 2: "unscored", 3: "no references"},
        {1: ["two dogs playing in the snow"], 3: [], 4: ["no prediction"]},
    )
    assert result["n"] == 1 and result["BLEU-4"] == pytest.approx(1.0)
    empty = caption_metrics({1: "a caption"}, {2: ["another"]})
    assert empty["n"] == 0 and all(empty[metric] is None for metric in METRICS)


def test_caption_metrics_without_pycocoevalcap_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n.startswith("pycocoevalcap")] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    with pytest.raises(DymuError, match=r"pip install 'dymu\[eval\]'"):
        caption_metrics({1: "a"}, {1: ["a"]})
