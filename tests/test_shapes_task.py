"""The tiny model's task (dymu/testing/shapes.py), its data files, and that the embedded model
really learned it: stock and DyMU answers are scored on the fixed test set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from legacy_family import FAMILY_DIRS, skip_without_legacy
from PIL import Image

import dymu
from dymu.api import format_prompt
from dymu.bench.data import SAMPLE_SHAPES, SAMPLE_SHAPES_COCO, load_data_file
from dymu.bench.quality import exact_match
from dymu.bench.report import build as build_report
from dymu.bench.run import BenchConfig, default_data
from dymu.bench.run import run as run_bench
from dymu.matrix import report
from dymu.matrix.golden import task_thresholds
from dymu.testing import shapes, shapes_data, tiny

# What the committed weights reach on the 48-question test set (hf family, float32 CPU): see the
# golden file for the exact answers. The floors sit below the measured values so that a model that
# lost its training (random weights: 0.0) fails, not a model that changed its last bits.
STOCK_FLOOR = 0.9
DYMU_FLOOR = 0.75


def _object_cells(image: Image.Image, color: str) -> int:
    """How many of the grid cells hold pixels near the objects' colour."""
    pixels = np.asarray(image).astype(np.int64)
    near = (np.abs(pixels - np.array(shapes.COLORS[color])) <= 24).all(axis=-1)
    cell, n = shapes.IMAGE_SIZE // shapes.GRID, shapes.GRID
    return sum(
        bool(near[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].any())
        for r in range(n)
        for c in range(n)
    )


def test_answers_name_colour_shape_and_count() -> None:
    scene = shapes.Scene("blue", "triangle", 3)
    assert [scene.answer(k) for k in shapes.QUESTIONS] == [
        "blue",
        "triangle",
        "three",
        "three blue triangles",
    ]
    assert shapes.Scene("red", "circle", 1).answer("describe") == "one red circle"
    with pytest.raises(ValueError, match="unknown question kind"):
        scene.answer("size")


def test_pictures_show_their_scene_and_are_reproducible() -> None:
    first = list(shapes.scenes(12, seed=5))
    again = list(shapes.scenes(12, seed=5))
    for (scene, image), (scene2, image2) in zip(first, again, strict=True):
        assert scene == scene2
        assert np.array_equal(np.asarray(image), np.asarray(image2))
        assert image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
        assert _object_cells(image, scene.color) == scene.count, scene
    assert len({s for s, _ in first}) > 6  # varied scenes, not one repeated


def test_shapes_differ_in_their_pixels() -> None:
    masks = {s: shapes._mask(s, 40, 20, 20, 12) for s in shapes.SHAPES}
    areas = {s: int(m.sum()) for s, m in masks.items()}
    assert areas["triangle"] < areas["square"] < areas["circle"]  # three different silhouettes
    assert masks["triangle"][9, 20] and not masks["triangle"][9, 10]  # apex up: narrow at the top
    assert masks["triangle"][31, 9] and masks["triangle"][31, 31]  # wide at the base


def test_scoring_is_exact_match_after_normalising() -> None:
    assert shapes.is_correct("Two red circles.", "two red circles")
    assert not shapes.is_correct("two red circle", "two red circles")
    assert not shapes.is_correct("two red circles and more", "two red circles")
    items = shapes.test_set(2, kinds=("color",))
    assert shapes.accuracy([items[0].answer, "purple"], items) == 0.5
    mixed = shapes.test_set(2, kinds=("count", "color"))
    answers = [it.answer if it.kind == "color" else "many" for it in mixed]
    assert shapes.accuracy_by_kind(answers, mixed) == {"color": 1.0, "count": 0.0}  # QUESTIONS order
    with pytest.raises(ValueError):
        shapes.accuracy(["red"], items)


def test_test_set_asks_every_kind_about_every_picture() -> None:
    items = shapes.test_set(12)
    assert len(items) == 48
    assert [it.kind for it in items[:4]] == list(shapes.QUESTIONS)
    assert all(it.answer == it.scene.answer(it.kind) for it in items)


def test_choice_options_hold_the_right_answer_once() -> None:
    rng = np.random.default_rng(0)
    for scene, _ in shapes.scenes(20, seed=3):
        for kind in shapes.CHOICE_QUESTIONS:
            options, letter = shapes.choice_options(scene, kind, rng)
            assert options[letter] == scene.answer(kind)
            assert len(set(options.values())) == len(options) >= 3
            assert sorted(options) == [chr(ord("A") + i) for i in range(len(options))]


def test_committed_shapes_data_files_are_what_the_writer_makes(tmp_path: Path) -> None:
    shapes_data.write(tmp_path)
    for name in (shapes_data.MMBENCH_FILE, shapes_data.COCO_FILE):
        assert json.loads((tmp_path / name).read_text()) == json.loads(
            (shapes_data.FOLDER / name).read_text()
        )
    for png in sorted((shapes_data.FOLDER / "images").glob("*.png")):
        assert np.array_equal(
            np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "images" / png.name))
        )
    mmbench, coco = load_data_file(SAMPLE_SHAPES), load_data_file(SAMPLE_SHAPES_COCO)
    assert len(mmbench.samples) == len(coco.samples) == shapes_data.N_IMAGES


def test_trained_weights_fit_only_the_default_dims() -> None:
    trained, random = tiny.tiny_weights(), tiny.tiny_weights(tiny.TinySpec(weights="random"))
    assert list(trained) == list(random)
    assert all(trained[k].shape == random[k].shape for k in trained)
    assert any(not np.array_equal(trained[k], random[k]) for k in trained)
    assert tiny.TinySpec().digest() != tiny.TinySpec(weights="random").digest()
    with pytest.raises(ValueError, match="use weights='random'"):
        tiny.tiny_weights(tiny.TinySpec(text_num_layers=3))
    with pytest.raises(ValueError, match="expected 'trained' or 'random'"):
        tiny.TinySpec(weights="pretrained")


@pytest.fixture(scope="module")
def task_answers() -> dict[str, list[str]]:
    items = shapes.test_set()
    prompts = [format_prompt(it.question) for it in items]
    path = tiny.ensure_tiny_checkpoints()[tiny.HF_SAFETENSORS]
    out = {}
    for mode, tau in (("stock", None), ("dymu", task_thresholds())):
        answers = dymu.load(path, thresholds=tau).generate(
            prompts, [it.image for it in items], max_new_tokens=16
        )
        out[mode] = [a.text for a in answers]
        out[f"{mode}-tokens"] = [a.visual_tokens for a in answers]
    return out


def test_the_embedded_model_answers_the_test_set(task_answers: dict[str, list]) -> None:
    items = shapes.test_set()
    assert shapes.accuracy(task_answers["stock"], items) >= STOCK_FLOOR
    assert shapes.accuracy(task_answers["dymu"], items) >= DYMU_FLOOR
    assert set(task_answers["stock-tokens"]) == {64}
    assert max(task_answers["dymu-tokens"]) < 64  # DyMU merged on every picture


def test_random_weights_fail_the_test_set() -> None:
    """The negative control: the same questions to the untrained fixture score (nearly) nothing."""
    items = shapes.test_set(4)
    path = tiny.ensure_tiny_checkpoints(spec=tiny.TinySpec(weights="random"))[tiny.HF_SAFETENSORS]
    answers = dymu.load(path).generate([format_prompt(it.question) for it in items], [it.image for it in items],
                                       max_new_tokens=16)  # fmt: skip
    assert shapes.accuracy([a.text for a in answers], items) <= 0.25


def test_the_matrix_report_shows_each_cells_task_accuracy() -> None:
    """The cells x stages table carries `stock / dymu` accuracy, the lowest over the cell's cases."""

    def case(stock: float, dymu_acc: float) -> dict:
        return {"status": "pass", "task_accuracy": {"stock": stock, "dymu": dymu_acc}}

    cell = {"cell": "c", "status": "pass", "versions": {"torch": "2.9.1", "transformers": "4.57.3"},
            "stages": {"inference": {"status": "pass", "cases": {"a": case(0.979, 0.958), "b": case(0.979, 0.917),
                                                                 "legacy": {"status": "n.a."}}}}}  # fmt: skip
    rows = [report.summarize(cell)]
    assert rows[0]["task_accuracy"] == "0.98 / 0.92"
    markdown, page = report.render_markdown(rows), report.render_html(rows)
    assert "accuracy stock / dymu" in markdown and "| 0.98 / 0.92 |" in markdown
    assert ">0.98 / 0.92</td>" in page
    no_inference = report.summarize({"cell": "d", "status": "fail", "stages": {}})
    assert no_inference["task_accuracy"] == "-"


@pytest.mark.parametrize("family", sorted(FAMILY_DIRS))
def test_answers_that_end_early_are_the_same_alone_and_in_a_batch(trained_checkpoints, family: str) -> None:
    """The trained model stops at EOS after one word or after several: a batch pads the short
    answers, and those pads must not reach `Answer.token_ids`."""
    skip_without_legacy(family)
    model = dymu.load(trained_checkpoints[FAMILY_DIRS[family]], thresholds=task_thresholds())
    scene, picture = shapes.sample_pictures(1)[0]
    prompts = [format_prompt(shapes.QUESTIONS[k]) for k in ("color", "describe")]
    batched = model.generate(prompts, [picture, picture], max_new_tokens=16)
    alone = [model.generate(p, picture, max_new_tokens=16)[0] for p in prompts]
    assert [a.token_ids for a in batched] == [a.token_ids for a in alone]
    assert [a.text for a in batched] == [scene.answer("color"), scene.answer("describe")]
    assert len(batched[0].token_ids) < len(batched[1].token_ids)
    assert all(a.token_ids[-1] == model.tokenizer.eos_token_id for a in batched)


@pytest.mark.parametrize("family", sorted(FAMILY_DIRS))
def test_stock_generate_pads_answers_that_end_early(trained_checkpoints, family: str) -> None:
    """Each family's own generate (the legacy one runs a prompt at a time) returns one padded
    (batch, longest) block, as a batched transformers generate does."""
    skip_without_legacy(family)
    model = dymu.load(trained_checkpoints[FAMILY_DIRS[family]])
    pictures = [image for _, image in shapes.sample_pictures(2)]
    ids = [model.tokenize(format_prompt(shapes.QUESTIONS[k])) for k in ("color", "describe")]
    out = model.family_impl.stock_generate(model.parts, ids, model.pixel_values(pictures), 16, pad_id=0)
    eos = model.tokenizer.eos_token_id
    rows = out.new_tokens.tolist()
    short = rows[0][: rows[0].index(eos) + 1]
    assert len(short) < len(rows[0]) and set(rows[0][len(short) :]) == {0}  # padded after its EOS
    assert eos in rows[1]
    assert out.first_scores.shape[0] == 2


def test_bench_without_arguments_scores_the_tiny_models_own_task(tmp_path: Path) -> None:
    """`dymu bench` on the tiny model defaults to the shapes task as captions, scored by exact
    match (no optional scorer), stock and DyMU, with no random-weights caveat; other models keep
    the photos."""
    assert default_data("tiny") == default_data("tiny-legacy") == "sample-shapes-coco"
    assert default_data("some/llava-v1.5-7b") == "sample"
    cfg = BenchConfig(model_path="tiny", max_new_tokens=16, report_file=str(tmp_path / "r.json"), limit=6,
                      progress=False)  # fmt: skip
    info, rows, _ = run_bench(cfg, ["dymu", "bench"])
    built = build_report(info, rows, load_data_file(SAMPLE_SHAPES_COCO), False)
    for mode in ("stock", "dymu"):
        q = built["modes"][mode]["quality"]
        assert q["kind"] == "captions" and q["note"] is None
        assert q["exact_match"] >= 0.5  # six pictures the model was trained to describe (random: 0)
    assert "random" not in info["weights"].lower()


def test_exact_match_ignores_case_and_punctuation_only() -> None:
    refs = {"0": ["two red circles"], "1": ["one blue square"]}
    assert exact_match({"0": "Two red circles.", "1": "one blue square"}, refs) == 1.0
    assert exact_match({"0": "two red circle", "1": "one blue square"}, refs) == 0.5
    assert exact_match({"0": "two red circles"}, refs) == 0.5  # a missing prediction is a miss
