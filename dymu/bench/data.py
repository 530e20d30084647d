"""Benchmark data files in the format users already have (their LLaVA scripts read it): a JSON
list of items, or `{"meta": {...}, "data": [...]}`, each item one image and one prompt.

We read those files exactly as they are, so a benchmark runs on the same prompts and images as
the user's own numbers; every problem is a one-line `DymuError` naming the file and the item.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import DymuError

# VLMEvalKit's captioning prompt (COCO_VAL); the trailing space is part of it
COCO_PROMPT = 'Please describe this image in general. Directly provide the description, do not include prefix like "This image depicts". '
# VLMEvalKit's multiple-choice closing line (MMBench); the space before the newline is part of it
MMBENCH_SUFFIX = "Please select the correct answer from the options above. \n"

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"
SAMPLE_DATA = SAMPLE_DIR / "coco_sample.json"  # 6 public-domain/CC0 photos with the COCO prompt
SAMPLE_MMBENCH = SAMPLE_DIR / "mmbench_sample.json"  # 4 multiple-choice questions on those photos
# the trained tiny model's task (dymu/testing/shapes_data.py): 12 pictures, one file per format
SAMPLE_SHAPES = SAMPLE_DIR / "shapes" / "shapes_mmbench.json"
SAMPLE_SHAPES_COCO = SAMPLE_DIR / "shapes" / "shapes_coco.json"

L2_KEYS = ("l2_category", "l2-category", "L2-category")  # spellings seen in the wild
_FIX = "fix the data file (each item: index, image_paths with one image, text_prompt)"


@dataclass
class Sample:
    """One benchmark item: one image, one prompt, and what our importers add for scoring."""

    index: int | str
    image_paths: list[str]  # as written in the file (resolve with `resolve_image`)
    text_prompt: str
    prompt_struct: list[dict[str, Any]]
    dataset: str | None = None
    image_id: Any = None
    answer: str | None = None  # MMBench: the correct letter
    options: dict[str, str] = field(default_factory=dict)  # MMBench: letter -> option text
    category: str | None = None
    l2_category: str | None = None
    references: list[str] | None = None  # COCO: reference captions
    raw: dict[str, Any] = field(default_factory=dict)  # the item exactly as read

    @property
    def image_path(self) -> str:
        """The item's single image (LLaVA-1.5 takes one per prompt; the loader checked it)."""
        return self.image_paths[0]


@dataclass
class DataFile:
    """A loaded data file; `sha256` of its bytes goes into reports so results name their data."""

    path: Path
    meta: dict[str, Any]
    samples: list[Sample]
    sha256: str

    def __len__(self) -> int:
        return len(self.samples)


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), f"a {type(value).__name__}")


def _where(position: int, index: Any = None) -> str:
    return f"item {position}" if index is None else f"item {position} (index {index!r})"


def _optional_str(path: Path, where: str, item: Mapping[str, Any], key: str) -> str | None:
    value = item.get(key)
    if value is None or isinstance(value, str):
        return value
    raise DymuError(f'{path}: {where} has "{key}" as {_kind(value)}; write it as a string or leave it out')


def _prompt_struct(path: Path, where: str, item: Mapping[str, Any], images: list[str], text: str) -> list:
    struct = item.get("prompt_struct")
    if struct is None:  # optional in the format: the image first, then the text, as LLaVA-1.5 sees it
        return [{"type": "image", "value": p} for p in images] + [{"type": "text", "value": text}]
    if not isinstance(struct, list) or not struct:
        raise DymuError(
            f'{path}: {where} has "prompt_struct" as {_kind(struct)}; write a list of '
            '{"type": "image"|"text", "value": ...} or leave it out'
        )
    for part in struct:
        if (
            not isinstance(part, dict)
            or part.get("type") not in ("image", "text")
            or not isinstance(part.get("value"), str)
        ):
            raise DymuError(
                f"{path}: {where} has a prompt_struct entry {json.dumps(part, ensure_ascii=False)[:80]}; "
                'each entry must be {"type": "image"|"text", "value": "<string>"}'
            )
    n_images = sum(part["type"] == "image" for part in struct)
    if n_images > 1:
        raise DymuError(
            f"{path}: {where} has {n_images} images in prompt_struct; "
            "LLaVA-1.5 takes one image per prompt: keep one image per item"
        )
    return struct


def _sample(path: Path, position: int, item: Any) -> Sample:
    if not isinstance(item, dict):
        raise DymuError(
            f"{path}: {_where(position)} is {_kind(item)}; each item must be an object with "
            "index, image_paths and text_prompt"
        )
    if "index" not in item:
        raise DymuError(f'{path}: {_where(position)} has no "index"; give every item a unique integer index')
    index = item["index"]
    if isinstance(index, bool) or not isinstance(index, (int, str)) or index == "":
        raise DymuError(
            f'{path}: {_where(position)} has "index" as {_kind(index)}; write an integer (or a non-empty string)'
        )
    where = _where(position, index)
    for key in ("image_paths", "text_prompt"):
        if key not in item:
            raise DymuError(f'{path}: {where} has no "{key}"; {_FIX}')
    images = item["image_paths"]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DymuError(
            f'{path}: {where} has "image_paths" as {_kind(images)}; write a list of one path string, '
            'e.g. ["images/1.jpg"]'
        )
    if len(images) != 1:
        raise DymuError(
            f"{path}: {where} has {len(images)} images; LLaVA-1.5 takes one image per prompt: "
            "keep exactly one path in image_paths"
        )
    text = item["text_prompt"]
    if not isinstance(text, str):
        raise DymuError(f'{path}: {where} has "text_prompt" as {_kind(text)}; write the prompt as a string')
    options = item.get("options") or {}
    if not isinstance(options, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in options.items()
    ):
        raise DymuError(f'{path}: {where} has "options" as {_kind(options)}; write {{"A": "text", ...}}')
    references = item.get("references")
    if references is not None and (
        not isinstance(references, list) or not all(isinstance(r, str) for r in references)
    ):
        raise DymuError(
            f'{path}: {where} has "references" as {_kind(references)}; write a list of caption strings'
        )
    l2_key = next((k for k in L2_KEYS if k in item), "l2_category")
    return Sample(
        index=index,
        image_paths=list(images),
        text_prompt=text,
        prompt_struct=_prompt_struct(path, where, item, images, text),
        dataset=_optional_str(path, where, item, "dataset"),
        image_id=item.get("image_id"),
        answer=_optional_str(path, where, item, "answer"),
        options=dict(options),
        category=_optional_str(path, where, item, "category"),
        l2_category=_optional_str(path, where, item, l2_key),
        references=list(references) if references is not None else None,
        raw=item,
    )


def load_data_file(path: str | Path) -> DataFile:
    """Read a data file in the users' format (a list of items, or {"meta", "data"}), checking
    every item up front so a long benchmark never dies at item 3,000 on a typo."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise DymuError(
            f"{path}: data file {what}; pass a JSON data file (a list of items or {{meta, data}})"
        )
    blob = path.read_bytes()
    try:
        doc = json.loads(blob.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DymuError(
            f"{path}: not UTF-8 text (byte {err.start}); save the data file as UTF-8 JSON"
        ) from None
    except json.JSONDecodeError as err:
        raise DymuError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); fix the JSON"
        ) from None
    if isinstance(doc, dict) and "data" in doc:
        meta, items = doc.get("meta") or {}, doc["data"]
        if not isinstance(meta, dict):
            raise DymuError(f'{path}: "meta" is {_kind(meta)}; write it as an object or leave it out')
        if not isinstance(items, list):
            raise DymuError(f'{path}: "data" is {_kind(items)}; write "data" as a list of items')
    elif isinstance(doc, list):
        meta, items = {}, doc
    else:
        found = 'an object without "data"' if isinstance(doc, dict) else _kind(doc)
        raise DymuError(
            f'{path}: the top level is {found}; write a list of items or {{"meta": {{...}}, "data": [...]}}'
        )
    if not items:
        raise DymuError(f"{path}: holds no items; add at least one item")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for position, raw in enumerate(items):
        sample = _sample(path, position, raw)
        key = str(sample.index)  # 7 and "7" name the same result row
        if key in seen:
            raise DymuError(
                f"{path}: {_where(position, sample.index)} repeats the index of item {seen[key]}; "
                "give every item a unique index"
            )
        seen[key] = position
        samples.append(sample)
    return DataFile(path=path, meta=meta, samples=samples, sha256=hashlib.sha256(blob).hexdigest())


def _strip_up(raw_path: str) -> list[str]:
    """The path's parts without its leading `..` and `.` segments."""
    parts = [p for p in re.split(r"[\\/]+", raw_path) if p]
    while parts and parts[0] in ("..", "."):
        parts.pop(0)
    return parts


def image_candidates(
    raw_path: str, data_file: str | Path, image_root: str | Path | None = None
) -> list[Path]:
    """Where `resolve_image` looks, in order (see there for the rule)."""
    raw = Path(raw_path)
    if raw.is_absolute():
        return [raw]
    found: list[Path] = []
    if image_root is not None:
        root = Path(image_root).absolute()
        found.append(root / raw)
        parts = _strip_up(raw_path)
        # every tail of the path, longest first: ../../LMUData/images/COCO/9.jpg under the root as
        # LMUData/images/COCO/9.jpg, images/COCO/9.jpg, COCO/9.jpg, then 9.jpg
        found += [root.joinpath(*parts[i:]) for i in range(len(parts))]
    found.append(Path(data_file).absolute().parent / raw)
    found.append(Path.cwd() / raw)
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def resolve_image(raw_path: str, data_file: str | Path, image_root: str | Path | None = None) -> Path:
    """The file an item's image path names, searched so that both kinds of file work unchanged.

    An absolute path is used as it is. A relative path (theirs: `../../LMUData/images/COCO/9.jpg`,
    historically relative to the directory their script ran in; ours: relative to the data file)
    is tried, first match wins:

    1. with `image_root`: `image_root/raw_path`, then every tail of the path with its leading
       `../` segments dropped, longest first (`LMUData/images/COCO/9.jpg`, `images/COCO/9.jpg`,
       `COCO/9.jpg`, `9.jpg`), so `--image-root` may name any folder along the original layout:
       the one holding `LMUData`, `LMUData/images`, or the `COCO` folder itself;
    2. the data file's folder (files our importers write, which travel with their images);
    3. the current working directory (how their script resolved it).

    Returns an absolute path; raises a one-line DymuError listing every place it looked.
    """
    candidates = image_candidates(raw_path, data_file, image_root)
    for path in candidates:
        if path.is_file():
            return path.parent.resolve() / path.name  # tidy `..` without following the file's own link
    hint = (
        "check the path"
        if Path(raw_path).is_absolute()
        else "pass --image-root DIR (the folder holding the images)"
    )
    raise DymuError(
        f"{data_file}: image {raw_path} not found (looked in {', '.join(map(str, candidates))}); {hint}"
    )


def mmbench_prompt(question: str, hint: str | None, options: Mapping[str, str]) -> str:
    """VLMEvalKit's multiple-choice prompt, byte for byte: the Hint line only when there is a
    hint, the options in letter order, and the closing line only when there are options."""
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{key}. {options[key]}\n" for key in sorted(options))
        prompt += MMBENCH_SUFFIX
    return prompt


def item(
    index: int | str,
    image_path: str | Path,
    text_prompt: str,
    dataset: str | None,
    image_id: Any = None,
    **extras: Any,
) -> dict[str, Any]:
    """One item in the users' format (what their script reads); `extras` (answer, options,
    category, l2_category, references) are added when not None, `l2_category` spelled as
    VLMEvalKit's `l2-category`."""
    image = Path(image_path).as_posix() if isinstance(image_path, Path) else image_path
    out: dict[str, Any] = {"index": index}
    if image_id is not None:
        out["image_id"] = image_id
    out["dataset"] = dataset
    out["image_paths"] = [image]
    out["text_prompt"] = text_prompt
    out["prompt_struct"] = [{"type": "image", "value": image}, {"type": "text", "value": text_prompt}]
    for key, value in extras.items():
        if value is not None:
            out["l2-category" if key == "l2_category" else key] = value
    return out


def write_data_file(path: str | Path, meta: Mapping[str, Any], items: Iterable[Mapping[str, Any]]) -> Path:
    """Write `{"meta": ..., "data": [...]}` atomically (UTF-8, indent 1, as their files are)."""
    doc = {"meta": dict(meta), "data": [dict(x) for x in items]}
    return write_text_atomic(path, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")


def relative_to(target: str | Path, folder: str | Path) -> str:
    """`target` as a POSIX path relative to `folder` (absolute where no relative path exists,
    e.g. another drive), so a data file can be moved together with its images."""
    try:
        return Path(os.path.relpath(Path(target).absolute(), Path(folder).absolute())).as_posix()
    except ValueError:
        return Path(target).absolute().as_posix()
