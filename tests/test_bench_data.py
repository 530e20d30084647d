"""Benchmark data files: the users' format read exactly as it is, image paths resolved the way an
ML engineer expects, one-line errors, and the VLMEvalKit/COCO importers on files in the real formats."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from dymu.bench.data import (
    COCO_PROMPT,
    MMBENCH_SUFFIX,
    SAMPLE_DATA,
    SAMPLE_MMBENCH,
    image_candidates,
    item,
    load_data_file,
    mmbench_prompt,
    resolve_image,
    write_data_file,
)
from dymu.bench.importers import import_coco, import_mmbench, main
from dymu.errors import DymuError

QUESTION = "Which object is red?"


def image_bytes(colour: tuple[int, int, int], fmt: str = "JPEG", size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """As VLMEvalKit's pandas `to_csv(sep="\\t")` writes it (minimal quoting)."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def their_item(index: int, path: str, **extra) -> dict:
    """One item exactly as the users' files hold it."""
    return {
        "index": index,
        "image_id": 9 + index,
        "dataset": "COCO_VAL",
        "image_paths": [path],
        "text_prompt": COCO_PROMPT,
        "prompt_struct": [{"type": "image", "value": path}, {"type": "text", "value": COCO_PROMPT}],
        **extra,
    }


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "; " in message, message
    return message


# -- the users' format ---------------------------------------------------------------------------


@pytest.fixture
def lmu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Their layout: images under LMUData/images/COCO, the data file two folders away, paths
    like ../../LMUData/images/COCO/9.jpg; the test runs from an unrelated folder."""
    images = tmp_path / "LMUData" / "images" / "COCO"
    images.mkdir(parents=True)
    (images / "9.jpg").write_bytes(image_bytes((200, 30, 30)))
    (images / "10.jpg").write_bytes(image_bytes((30, 200, 30)))
    data = tmp_path / "work" / "bench" / "coco.json"
    data.parent.mkdir(parents=True)
    items = [
        their_item(0, "../../LMUData/images/COCO/9.jpg"),
        their_item(1, "../../LMUData/images/COCO/10.jpg"),
    ]
    data.write_text(json.dumps({"meta": {"seed": 42}, "data": items}, ensure_ascii=False, indent=1))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return tmp_path, data


def test_their_file_loads_as_written(lmu) -> None:
    _, path = lmu
    data = load_data_file(path)
    assert data.meta == {"seed": 42} and len(data) == 2
    first = data.samples[0]
    assert first.index == 0 and first.image_id == 9 and first.dataset == "COCO_VAL"
    assert first.image_paths == ["../../LMUData/images/COCO/9.jpg"] and first.text_prompt == COCO_PROMPT
    assert first.text_prompt.endswith('"This image depicts". ')
    assert first.prompt_struct[0] == {"type": "image", "value": "../../LMUData/images/COCO/9.jpg"}
    assert first.raw == json.loads(path.read_text())["data"][0]
    assert first.answer is None and first.options == {} and first.references is None
    assert re.fullmatch(r"[0-9a-f]{64}", data.sha256)


@pytest.mark.parametrize(
    "root",
    ["", "LMUData", "LMUData/images", "LMUData/images/COCO"],
    ids=["above-LMUData", "LMUData", "LMUData-images", "COCO-folder"],
)
def test_their_relative_paths_resolve_through_any_image_root_along_the_layout(lmu, root: str) -> None:
    base, path = lmu
    data = load_data_file(path)
    got = [resolve_image(s.image_path, path, base / root) for s in data.samples]
    assert got == [base / "LMUData/images/COCO/9.jpg", base / "LMUData/images/COCO/10.jpg"]
    assert all(p.is_absolute() and ".." not in p.parts for p in got)


def test_their_paths_resolve_from_the_directory_their_script_ran_in(lmu, monkeypatch) -> None:
    base, path = lmu
    (base / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(base / "a" / "b")  # ../../LMUData from here is base/LMUData
    assert resolve_image("../../LMUData/images/COCO/9.jpg", path, None) == base / "LMUData/images/COCO/9.jpg"


def test_a_missing_image_lists_every_place_looked(lmu) -> None:
    base, path = lmu
    root = base / "nowhere"
    with pytest.raises(DymuError) as excinfo:
        resolve_image("../../LMUData/images/COCO/404.jpg", path, root)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: image ../../LMUData/images/COCO/404.jpg not found (looked in ")
    for place in image_candidates("../../LMUData/images/COCO/404.jpg", path, root):
        assert str(place) in message
    assert str(root / "COCO" / "404.jpg") in message and str(path.parent / "../../LMUData") in message
    assert str(Path.cwd() / "../../LMUData") in message and message.endswith(
        "pass --image-root DIR (the folder holding the images)"
    )


def test_resolution_order_root_then_data_folder_then_cwd(tmp_path, monkeypatch) -> None:
    root, data_dir, cwd = tmp_path / "root", tmp_path / "data", tmp_path / "cwd"
    data = data_dir / "d.json"
    for folder in (root, data_dir, cwd):
        (folder / "img").mkdir(parents=True)
        (folder / "img" / "x.png").write_bytes(image_bytes((1, 2, 3), "PNG"))
    monkeypatch.chdir(cwd)
    assert image_candidates("img/x.png", data, root) == [
        root / "img/x.png", root / "x.png", data_dir / "img/x.png", cwd / "img/x.png"
    ]  # fmt: skip
    assert resolve_image("img/x.png", data, root) == root / "img/x.png"
    (root / "img" / "x.png").unlink()
    assert resolve_image("img/x.png", data, root) == data_dir / "img/x.png"
    (data_dir / "img" / "x.png").unlink()
    assert resolve_image("img/x.png", data, root) == cwd / "img/x.png"
    assert resolve_image(str(cwd / "img/x.png"), data, root) == cwd / "img/x.png"  # absolute: as is
    with pytest.raises(DymuError, match=r"looked in /.*/absent\.png\); check the path"):
        resolve_image(str(cwd / "absent.png"), data, root)


def test_the_longest_tail_under_the_root_wins(tmp_path) -> None:
    """`9.jpg` directly under the root must not shadow COCO/9.jpg of the same layout."""
    root = tmp_path / "images"
    (root / "COCO").mkdir(parents=True)
    (root / "COCO" / "9.jpg").write_bytes(image_bytes((5, 5, 5)))
    (root / "9.jpg").write_bytes(image_bytes((9, 9, 9)))
    got = resolve_image("../../LMUData/images/COCO/9.jpg", tmp_path / "d.json", root)
    assert got == root / "COCO" / "9.jpg"


def test_a_bare_list_without_prompt_struct_loads(tmp_path) -> None:
    path = tmp_path / "bare.json"
    path.write_text(json.dumps([{"index": 3, "image_paths": ["a.jpg"], "text_prompt": "Describe."}]))
    data = load_data_file(path)
    assert data.meta == {} and data.samples[0].dataset is None and data.samples[0].image_id is None
    assert data.samples[0].prompt_struct == [
        {"type": "image", "value": "a.jpg"}, {"type": "text", "value": "Describe."}
    ]  # fmt: skip


@pytest.mark.parametrize("key", ["l2_category", "l2-category", "L2-category"])
def test_every_l2_category_spelling_is_read(tmp_path, key: str) -> None:
    path = write_data_file(
        tmp_path / "m.json", {}, [{**item(1, "a.jpg", "q", "MMB"), key: "logic_reasoning"}]
    )
    assert load_data_file(path).samples[0].l2_category == "logic_reasoning"


GOOD = {"index": 0, "image_paths": ["a.jpg"], "text_prompt": "p"}
MALFORMED = {
    "not-json": ("{", r"not valid JSON \(Expecting property name .* line 1 column 2\); fix the JSON"),
    "a-number": ("7", r"the top level is an integer; write a list of items or"),
    "object-without-data": ({"items": []}, r'the top level is an object without "data"; write a list'),
    "data-not-list": ({"data": {"a": 1}}, r'"data" is an object; write "data" as a list of items'),
    "meta-not-object": ({"meta": [1], "data": [GOOD]}, r'"meta" is a list; write it as an object'),
    "empty": ([], r"holds no items; add at least one item"),
    "item-not-object": ([GOOD, "x.jpg"], r"item 1 is a string; each item must be an object"),
    "no-index": ([{"image_paths": ["a.jpg"], "text_prompt": "p"}], r'item 0 has no "index"; give every item'),
    "bool-index": ([{**GOOD, "index": True}], r'item 0 has "index" as a boolean; write an integer'),
    "float-index": ([{**GOOD, "index": 1.5}], r'item 0 has "index" as a number; write an integer'),
    "no-image-paths": ([{"index": 4, "text_prompt": "p"}], r'item 0 \(index 4\) has no "image_paths"; fix'),
    "no-text-prompt": (
        [GOOD, {"index": 5, "image_paths": ["b.jpg"]}],
        r'item 1 \(index 5\) has no "text_prompt"',
    ),
    "image-paths-string": (
        [{**GOOD, "image_paths": "a.jpg"}],
        r'"image_paths" as a string; write a list of one',
    ),
    "image-paths-int": ([{**GOOD, "image_paths": [3]}], r'"image_paths" as a list; write a list of one path'),
    "no-image": (
        [{**GOOD, "image_paths": []}],
        r"item 0 \(index 0\) has 0 images; LLaVA-1.5 takes one image",
    ),
    "two-images": (
        [{**GOOD, "image_paths": ["a.jpg", "b.jpg"]}],
        r"has 2 images; LLaVA-1.5 takes one image per",
    ),
    "two-images-in-struct": (
        [{**GOOD, "prompt_struct": [{"type": "image", "value": "a"}, {"type": "image", "value": "b"}]}],
        r"has 2 images in prompt_struct; LLaVA-1.5 takes one image per prompt",
    ),
    "bad-struct-entry": (
        [{**GOOD, "prompt_struct": [{"type": "video", "value": "v"}]}],
        r'each entry must be \{"type"',
    ),
    "text-not-string": (
        [{**GOOD, "text_prompt": ["p"]}],
        r'"text_prompt" as a list; write the prompt as a string',
    ),
    "dataset-not-string": ([{**GOOD, "dataset": 1}], r'"dataset" as an integer; write it as a string'),
    "duplicate-index": (
        [GOOD, {**GOOD, "index": "0"}],
        r"item 1 \(index '0'\) repeats the index of item 0; give",
    ),
}


@pytest.mark.parametrize("content,problem", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_files_are_one_line_errors_naming_file_item_and_fix(tmp_path, content, problem) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DymuError) as excinfo:
        load_data_file(path)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: ") and re.search(problem, message), message


def test_missing_and_non_utf8_files_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(DymuError, match=r"absent\.json: data file not found; pass a JSON data file"):
        load_data_file(tmp_path / "absent.json")
    with pytest.raises(DymuError, match=r": data file is a folder; pass"):
        load_data_file(tmp_path)
    (tmp_path / "latin1.json").write_bytes('[{"text_prompt": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DymuError, match=r"not UTF-8 text \(byte \d+\); save the data file as UTF-8"):
        load_data_file(tmp_path / "latin1.json")


def test_written_files_are_their_format_and_read_back(tmp_path) -> None:
    items = [item(0, Path("imgs/é.jpg"), COCO_PROMPT, "COCO_VAL", image_id=139, references=["Un café."])]
    path = write_data_file(tmp_path / "out" / "d.json", {"n": 1}, items)
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n "meta": {\n  "n": 1\n }') and "é" in text and text.endswith("}\n")
    sample = load_data_file(path).samples[0]
    assert (
        sample.image_paths == ["imgs/é.jpg"] and sample.references == ["Un café."] and sample.image_id == 139
    )
    assert sample.raw["prompt_struct"] == [
        {"type": "image", "value": "imgs/é.jpg"}, {"type": "text", "value": COCO_PROMPT}
    ]  # fmt: skip


def test_mmbench_prompt_matches_vlmevalkit() -> None:
    options = {"B": "blue", "A": "red"}
    assert mmbench_prompt(QUESTION, "Look closely.", options) == (
        "Hint: Look closely.\nQuestion: Which object is red?\nOptions:\nA. red\nB. blue\n" + MMBENCH_SUFFIX
    )
    assert mmbench_prompt(QUESTION, None, options).startswith("Question: ")
    assert mmbench_prompt(QUESTION, "", {}) == "Question: Which object is red?\n"
    assert MMBENCH_SUFFIX == "Please select the correct answer from the options above. \n"


# -- importers ------------------------------------------------------------------------------------

MMB_HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "E",
    "answer",
    "category",
    "image",
    "l2-category",
]


def mmbench_tsv(tmp_path: Path) -> Path:
    jpeg, png = image_bytes((220, 20, 20)), image_bytes((20, 20, 220), "PNG")
    rows = [
        ["0", QUESTION, "A hint with a\ttab and \"quotes\"", "red", "blue", "", "", "", "A", "color", b64(jpeg), "attr"],
        ["1", "Same picture, other question?", "nan", "yes", "no", "maybe", "nan", "", "B", "logic", "0", "reason"],
        ["2", "Which colour?", "", "red", "blue", "green", "white", "black", "B", "color", b64(png), "attr"],
        ["7", "Option None?", "NaN", "None", "Some", "All", "nan", "", "B", "logic", b64(jpeg), "reason"],
    ]  # fmt: skip
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_HEADER, rows)


def test_import_mmbench_writes_their_format_with_answers(tmp_path) -> None:
    out = import_mmbench(mmbench_tsv(tmp_path), tmp_path / "out" / "mmbench.json", tmp_path / "out" / "imgs")
    data = load_data_file(out)
    s0, s1, s2, s7 = data.samples
    assert [s.index for s in data.samples] == [0, 1, 2, 7] and data.meta["dataset"] == "MMBench_DEV_EN"
    assert s0.text_prompt == (
        'Hint: A hint with a\ttab and "quotes"\nQuestion: Which object is red?\nOptions:\nA. red\nB. blue\n'
        + MMBENCH_SUFFIX
    )
    assert s0.options == {"A": "red", "B": "blue"} and s0.answer == "A"
    assert s0.category == "color" and s0.l2_category == "attr" and s0.dataset == "MMBench_DEV_EN"
    assert s1.text_prompt.startswith("Question: Same picture") and s1.options == {
        "A": "yes",
        "B": "no",
        "C": "maybe",
    }
    assert s2.options["E"] == "black" and "E. black\n" in s2.text_prompt
    assert s7.options == {"B": "Some", "C": "All"}  # "None" is missing to pandas, so to VLMEvalKit too
    assert s0.image_paths == ["imgs/0.jpg"] and s1.image_paths == ["imgs/0.jpg"]  # row 1 reuses row 0's image
    assert s2.image_paths == ["imgs/2.png"] and s7.image_paths == ["imgs/7.jpg"]
    assert sorted(p.name for p in (tmp_path / "out" / "imgs").iterdir()) == ["0.jpg", "2.png", "7.jpg"]
    for sample in data.samples:
        with Image.open(resolve_image(sample.image_path, out, None)) as img:
            assert img.size == (24, 16)
    assert s2.raw["l2-category"] == "attr" and "l2_category" not in s2.raw


def test_imported_files_travel_with_their_images(tmp_path, monkeypatch) -> None:
    import_mmbench(mmbench_tsv(tmp_path), tmp_path / "a" / "mmb.json")  # default image folder
    assert (tmp_path / "a" / "mmb_images" / "0.jpg").is_file()
    moved = tmp_path / "moved"
    (tmp_path / "a").rename(moved)
    monkeypatch.chdir(tmp_path)
    data = load_data_file(moved / "mmb.json")
    assert resolve_image(data.samples[0].image_path, data.path, None) == moved / "mmb_images" / "0.jpg"


def test_import_mmbench_accepts_the_L2_spelling_and_no_hint_column(tmp_path) -> None:
    header = ["index", "question", "A", "B", "answer", "category", "L2-category", "image"]
    tsv = write_tsv(
        tmp_path / "mmb.tsv", header, [["5", "Q?", "x", "y", "A", "c", "l2", b64(image_bytes((0, 0, 0)))]]
    )
    sample = load_data_file(import_mmbench(tsv, tmp_path / "m.json", tmp_path / "i")).samples[0]
    assert (
        sample.l2_category == "l2"
        and sample.dataset == "mmb"
        and sample.text_prompt.startswith("Question: Q?")
    )


def mmb_row(index: str, image: str) -> list[str]:
    return [index, "Q?", "nan", "x", "y", "", "", "", "A", "c", image, "l2"]


@pytest.mark.parametrize(
    "header,rows,problem",
    [
        (["index", "A", "B", "image"], [], r"no column question in the header \(index, A, B, image\); pass"),
        (
            ["index", "question", "image", "answer"],
            [],
            r"no option columns \(A, B, \.\.\.\); pass an MMBench",
        ),
        (
            MMB_HEADER,
            [mmb_row("0", "not*base64")],
            r"line 2 \(index 0\): the image cell is not valid base64; ",
        ),
        (MMB_HEADER, [mmb_row("0", b64(b"hello world, no image"))], r"decodes to no known image format"),
        (
            MMB_HEADER,
            [mmb_row("0", "12")],
            r"line 2 \(index 0\) reuses the image of row 12, which is not in the",
        ),
        (
            MMB_HEADER,
            [mmb_row("0", "1"), mmb_row("1", "0")],
            r"reuses the image of row 1, which is itself a ref",
        ),
        (
            MMB_HEADER,
            [mmb_row("0", b64(image_bytes((0, 0, 0))))] * 2,
            r"line 3 repeats index 0 \(first on line 2\)",
        ),
        (MMB_HEADER, [mmb_row("0", "0")[:-2]], r"line 2 has 10 cells but the header has 12; the TSV is cut"),
    ],
    ids=[
        "no-question",
        "no-options",
        "bad-base64",
        "not-an-image",
        "missing-ref",
        "ref-to-ref",
        "dup",
        "short-row",
    ],
)
def test_malformed_tsv_is_a_one_line_error(tmp_path, header, rows, problem) -> None:
    tsv = write_tsv(tmp_path / "bad.tsv", header, rows)
    with pytest.raises(DymuError) as excinfo:
        import_mmbench(tsv, tmp_path / "o.json", tmp_path / "i")
    message = one_line_error(excinfo)
    assert message.startswith(f"{tsv}: ") and re.search(problem, message), message
    assert not (tmp_path / "o.json").exists()


def test_missing_tsv_is_a_one_line_error(tmp_path) -> None:
    with pytest.raises(DymuError, match=r"nope\.tsv: TSV file not found; pass VLMEvalKit's TSV"):
        import_mmbench(tmp_path / "nope.tsv", tmp_path / "o.json", tmp_path / "i")


def coco_tsv(tmp_path: Path, count: int = 6) -> Path:
    rows = [
        [str(i), b64(image_bytes((40 * i, 10, 10))), "['A red square. ', \"It's a block.\"]"]
        for i in range(count)
    ]
    rows.append([str(count), str(count - 1), '["Same image, JSON list."]'])  # reuses the previous image
    return write_tsv(tmp_path / "COCO_VAL.tsv", ["index", "image", "answer"], rows)


def test_import_coco_from_vlmevalkit_tsv(tmp_path) -> None:
    out = import_coco(tmp_path / "coco.json", tsv=coco_tsv(tmp_path))
    data = load_data_file(out)
    assert len(data) == 7 and data.meta["dataset"] == "COCO_VAL"
    first, last = data.samples[0], data.samples[-1]
    assert first.text_prompt == COCO_PROMPT and first.dataset == "COCO_VAL" and first.image_id == 0
    assert first.references == ["A red square. ", "It's a block."] and first.image_paths == [
        "coco_images/0.jpg"
    ]
    assert last.references == ["Same image, JSON list."] and last.image_paths == ["coco_images/5.jpg"]


def test_import_coco_tsv_subset_decodes_only_what_it_keeps(tmp_path) -> None:
    tsv = coco_tsv(tmp_path)
    out = import_coco(tmp_path / "s.json", tsv=tsv, n=3, seed=1, image_dir=tmp_path / "imgs")
    kept = [s.index for s in load_data_file(out).samples]
    assert len(kept) == 3 and kept == sorted(kept)
    written = {p.stem for p in (tmp_path / "imgs").iterdir()}
    needed = {str(i) for i in kept} | ({"5"} if 6 in kept else set())
    assert written == needed


def test_a_python_list_literal_is_parsed_never_evaluated(tmp_path) -> None:
    blob = b64(image_bytes((1, 1, 1)))
    tsv = write_tsv(
        tmp_path / "c.tsv", ["index", "image", "answer"], [["0", blob, "__import__('os').getcwd()"]]
    )
    with pytest.raises(
        DymuError, match=r"line 2 \(index 0\): the answer cell is not a list of caption strings"
    ):
        import_coco(tmp_path / "c.json", tsv=tsv)


def coco_captions(tmp_path: Path, count: int = 20) -> tuple[Path, Path]:
    images = tmp_path / "val2017"
    images.mkdir()
    ids = [139 + 37 * i for i in range(count)]
    for image_id in ids:
        (images / f"{image_id:012d}.jpg").write_bytes(image_bytes((image_id % 255, 0, 0)))
    doc = {
        "info": {"description": "COCO 2017 Dataset"},
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 16, "width": 24} for i in reversed(ids)],
        "annotations": [
            {"id": 10 * i + k, "image_id": i, "caption": f"Picture {i}, caption {k}."}
            for i in ids
            for k in range(2)
        ],
    }
    captions = tmp_path / "annotations" / "captions_val2017.json"
    captions.parent.mkdir()
    captions.write_text(json.dumps(doc))
    return captions, images


def test_import_coco_from_captions_with_a_reproducible_subset(tmp_path) -> None:
    captions, images = coco_captions(tmp_path)
    a = import_coco(tmp_path / "runs" / "a.json", captions=captions, images=images, n=5, seed=42)
    b = import_coco(tmp_path / "runs" / "b.json", captions=captions, images=images, n=5, seed=42)
    c = import_coco(tmp_path / "runs" / "c.json", captions=captions, images=images, n=5, seed=7)
    da, db, dc = (load_data_file(p) for p in (a, b, c))
    ids = [s.image_id for s in da.samples]
    assert ids == [s.image_id for s in db.samples] and ids != [s.image_id for s in dc.samples]
    assert ids == sorted(ids) and len(set(ids)) == 5 and [s.index for s in da.samples] == [0, 1, 2, 3, 4]
    first = da.samples[0]
    assert first.references == [f"Picture {ids[0]}, caption 0.", f"Picture {ids[0]}, caption 1."]
    assert first.image_paths == [f"../val2017/{ids[0]:012d}.jpg"] and first.text_prompt == COCO_PROMPT
    assert resolve_image(first.image_path, a, None) == images / f"{ids[0]:012d}.jpg"
    assert da.meta == {"dataset": "COCO_VAL", "source": "captions_val2017.json", "items": 5, "made_by":
                       "dymu data coco", "n": 5, "seed": 42}  # fmt: skip
    everything = load_data_file(import_coco(tmp_path / "all.json", captions=captions, images=images))
    assert [s.image_id for s in everything.samples] == sorted(139 + 37 * i for i in range(20))


def test_import_coco_from_captions_can_copy_the_subset(tmp_path) -> None:
    captions, images = coco_captions(tmp_path, count=4)
    out = import_coco(
        tmp_path / "o" / "c.json", captions=captions, images=images, n=2, image_dir=tmp_path / "o" / "im"
    )
    data = load_data_file(out)
    assert (
        all(s.image_path.startswith("im/") for s in data.samples)
        and len(list((tmp_path / "o" / "im").iterdir())) == 2
    )


def test_import_coco_argument_errors(tmp_path) -> None:
    captions, images = coco_captions(tmp_path, count=3)
    with pytest.raises(
        DymuError, match=r"pass either --tsv COCO_VAL\.tsv or both --captions FILE and --images"
    ):
        import_coco(tmp_path / "o.json", captions=captions)
    with pytest.raises(DymuError, match=r"pass either"):
        import_coco(tmp_path / "o.json", tsv=tmp_path / "x.tsv", captions=captions, images=images)
    with pytest.raises(DymuError, match=r"--n 4 but it holds 3 images; pass 1 <= --n <= 3"):
        import_coco(tmp_path / "o.json", captions=captions, images=images, n=4)
    (images / f"{139:012d}.jpg").unlink()
    with pytest.raises(DymuError, match=r"000000000139\.jpg: image 139 of captions_val2017\.json not found"):
        import_coco(tmp_path / "o.json", captions=captions, images=images)
    (tmp_path / "junk.json").write_text('{"images": [{"file_name": "a.jpg"}]}')
    with pytest.raises(DymuError, match=r"not a COCO captions file \(no 'id'\); pass captions_val2017\.json"):
        import_coco(tmp_path / "o.json", captions=tmp_path / "junk.json", images=images)


def test_cli_prints_one_summary_line(tmp_path, capsys) -> None:
    assert main(["mmbench", "--tsv", str(mmbench_tsv(tmp_path)), "--out", str(tmp_path / "m.json")]) == 0
    captions, images = coco_captions(tmp_path, count=3)
    args = ["coco", "--captions", str(captions), "--images", str(images), "--out", str(tmp_path / "c.json")]
    assert main([*args, "--n", "2", "--seed", "42"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"wrote {tmp_path / 'm.json'}: 4 MMBench_DEV_EN items")
    assert "2 COCO_VAL items" in lines[1] and (tmp_path / "m_images" / "0.jpg").is_file()
    with pytest.raises(DymuError, match="pass either"):
        main(["coco", "--out", str(tmp_path / "x.json")])


# -- the packaged sample ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SAMPLE_DATA, SAMPLE_MMBENCH], ids=["coco", "mmbench"])
def test_packaged_sample_loads_and_every_image_opens(path: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # resolved against the data file, not the cwd
    data = load_data_file(path)
    assert [s.index for s in data.samples] == list(range(len(data)))
    for sample in data.samples:
        image = resolve_image(sample.image_path, data.path, None)
        assert image.parent == path.parent / "images" and image.stat().st_size < 40_000
        with Image.open(image) as img:
            assert img.format == "JPEG" and max(img.size) <= 336
            img.load()


def test_packaged_samples_are_their_format() -> None:
    coco = load_data_file(SAMPLE_DATA)
    assert len(coco) == 6 and {s.dataset for s in coco.samples} == {"COCO_VAL"}
    assert all(s.text_prompt == COCO_PROMPT and s.references and len(s.references) >= 2 for s in coco.samples)
    mmb = load_data_file(SAMPLE_MMBENCH)
    for s in mmb.samples:
        assert s.dataset == "MMBench_DEV_EN" and s.answer in s.options and s.category and s.l2_category
        hint = s.text_prompt.split("\n")[0][len("Hint: ") :] if s.text_prompt.startswith("Hint: ") else None
        question = s.text_prompt.split("Question: ")[1].split("\n")[0]
        assert s.text_prompt == mmbench_prompt(question, hint, s.options)
