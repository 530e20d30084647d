"""`dymu data`: turn VLMEvalKit's TSV files (MMBench, COCO_VAL) or COCO's own captions file into
data files in the users' format, with the answers and reference captions their files lack.

The images are extracted next to the data file and named relative to it, so the pair can be
moved or copied anywhere and still load.
"""

from __future__ import annotations

import argparse
import ast
import base64
import binascii
import csv
import io
import json
import random
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..atomic import write_atomic
from ..errors import DymuError, run_main
from .data import COCO_PROMPT, item, mmbench_prompt, relative_to, write_data_file

# the cells pandas.read_csv reads as missing by default: VLMEvalKit reads the TSV with pandas, so
# an option cell "None" or "nan" is an absent option there, and must be here for the same prompt
NA_CELLS = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
     "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
)  # fmt: skip
MAGIC = [  # (prefix, offset, suffix): the image format from its first bytes
    (b"\xff\xd8\xff", 0, ".jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, ".png"),
    (b"GIF8", 0, ".gif"),
    (b"WEBP", 8, ".webp"),
    (b"BM", 0, ".bmp"),
]
REF_MAX = 64  # an image cell this short and all digits names the row whose image it reuses
OPTION_COLUMN = re.compile(r"^[A-Z]$")


def _na(cell: str | None) -> bool:
    return cell is None or cell in NA_CELLS


def _cell(row: dict[str, str], key: str) -> str | None:
    """A cell, or None where it is absent or a missing-value spelling."""
    value = row.get(key)
    return None if _na(value) else value


def _index(cell: str) -> int | str:
    """TSV indices are integers in VLMEvalKit's files; keep anything else as written."""
    return int(cell) if re.fullmatch(r"-?\d+", cell.strip()) else cell.strip()


def _raise_field_limit() -> None:
    """csv refuses cells over 128 KiB by default; a base64 photo is megabytes."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # a C long is 32 bits on Windows
            limit //= 2


def _image_suffix(blob: bytes) -> str | None:
    for magic, offset, suffix in MAGIC:
        if blob[offset : offset + len(magic)] == magic:
            return suffix
    try:
        with Image.open(io.BytesIO(blob)) as img:
            return f".{img.format.lower()}" if img.format else None
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _safe_name(index: int | str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(index)).lstrip(".") or "_"


@dataclass
class _Row:
    line: int
    index: int | str
    cells: dict[str, str]  # every cell but the image
    image: Path | None = None


def _rows(
    tsv: Path, required: tuple[str, ...], options: bool = False
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row; the header (required columns, and option columns A,
    B, ... when `options`) and row lengths are checked."""
    if not tsv.is_file():
        raise DymuError(f"{tsv}: TSV file not found; pass VLMEvalKit's TSV (e.g. LMUData/MMBench_DEV_EN.tsv)")
    _raise_field_limit()
    with tsv.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DymuError(
                    f"{tsv}: no column {', '.join(missing)} in the header ({', '.join(header)[:200]}); "
                    "pass VLMEvalKit's TSV file with its header row"
                )
            if options and not any(OPTION_COLUMN.match(h) for h in header):
                raise DymuError(f"{tsv}: no option columns (A, B, ...); pass an MMBench TSV with its options")
            for cells in reader:
                if not cells:
                    continue
                if len(cells) != len(header):
                    raise DymuError(
                        f"{tsv}: line {reader.line_num} has {len(cells)} cells but the header has "
                        f"{len(header)}; the TSV is cut or mis-quoted, download it again"
                    )
                yield reader.line_num, dict(zip(header, cells, strict=True))
        except csv.Error as err:
            raise DymuError(
                f"{tsv}: line {reader.line_num}: {err}; the TSV is damaged, download it again"
            ) from None
        except UnicodeDecodeError:
            raise DymuError(f"{tsv}: not UTF-8 text; pass VLMEvalKit's TSV file as downloaded") from None


def _is_ref(cell: str) -> bool:
    cell = cell.strip()
    return len(cell) < REF_MAX and cell.isdigit()


def _extract(
    tsv: Path,
    image_dir: Path,
    required: tuple[str, ...],
    choose: Callable[[list[int | str]], list[int | str]] | None = None,
    options: bool = False,
) -> list[_Row]:
    """Rows of a VLMEvalKit TSV with their images written to `image_dir/<index><suffix>`.

    `choose` (the sorted indices -> the ones to keep) makes a first pass that reads only the
    indices, so a subset decodes only its own images. A row whose image cell is another row's
    index points at that row's file (VLMEvalKit's way of storing a shared image once).
    """
    wanted: set[str] | None = None
    targets: set[str] = set()
    if choose is not None:
        refs: dict[str, str] = {}
        indices: list[int | str] = []
        for _, row in _rows(tsv, required, options):
            indices.append(_index(row["index"]))
            if _is_ref(row["image"]):
                refs[str(indices[-1])] = str(int(row["image"]))
        order = sorted(indices, key=lambda i: (isinstance(i, str), i))
        wanted = {str(i) for i in choose(order)}
        targets = {refs[k] for k in wanted if k in refs}
    image_dir.mkdir(parents=True, exist_ok=True)
    kept: list[_Row] = []
    files: dict[str, Path] = {}
    pending: dict[str, str] = {}  # row index -> the index whose image it reuses
    seen: dict[str, int] = {}
    for line, cells in _rows(tsv, required, options):
        index = _index(cells["index"])
        key = str(index)
        if key in seen:
            raise DymuError(
                f"{tsv}: line {line} repeats index {index} (first on line {seen[key]}); "
                "the TSV is damaged, download it again"
            )
        seen[key] = line
        if wanted is not None and key not in wanted and key not in targets:
            continue
        cell = cells.pop("image").strip()
        if _is_ref(cell):
            pending[key] = str(int(cell))
        else:
            try:
                blob = base64.b64decode(cell, validate=True)
            except (binascii.Error, ValueError):
                raise DymuError(
                    f"{tsv}: line {line} (index {index}): the image cell is not valid base64; "
                    "the TSV is damaged, download it again"
                ) from None
            suffix = _image_suffix(blob)
            if suffix is None:
                raise DymuError(
                    f"{tsv}: line {line} (index {index}): the image cell decodes to no known image "
                    f"format (starts {blob[:8]!r}); the TSV is damaged, download it again"
                )
            path = image_dir / f"{_safe_name(index)}{suffix}"
            write_atomic(path, lambda tmp, blob=blob: tmp.write_bytes(blob))
            files[key] = path
        if wanted is None or key in wanted:
            kept.append(_Row(line, index, cells))
    for row in kept:
        key = str(row.index)
        target = pending.get(key)
        if target is not None:
            if target not in files:
                why = "is itself a reference" if target in pending else "is not in the file"
                raise DymuError(
                    f"{tsv}: line {row.line} (index {row.index}) reuses the image of row {target}, which "
                    f"{why}; the TSV is damaged, download it again"
                )
            files[key] = files[target]
        row.image = files[key]
    return kept


def _default_image_dir(out: Path) -> Path:
    return out.parent / f"{out.stem}_images"


def import_mmbench(tsv: str | Path, out: str | Path, image_dir: str | Path | None = None) -> Path:
    """VLMEvalKit's MMBench TSV -> a data file with VLMEvalKit's prompts plus `answer`, `options`,
    `category` and `l2-category`; images go to `image_dir` (default `<out stem>_images/`)."""
    tsv, out = Path(tsv), Path(out)
    image_dir = Path(image_dir) if image_dir is not None else _default_image_dir(out)
    rows = _extract(tsv, image_dir, ("index", "question", "image"), options=True)
    items = []
    for row in rows:
        cells = row.cells
        options = {k: v for k, v in cells.items() if OPTION_COLUMN.match(k) and not _na(v)}
        question = cells["question"]
        items.append(
            item(
                row.index,
                relative_to(row.image, out.parent),  # type: ignore[arg-type]
                mmbench_prompt(question, _cell(cells, "hint"), options),
                tsv.stem,
                answer=_cell(cells, "answer"),
                options=dict(sorted(options.items())),
                category=_cell(cells, "category"),
                l2_category=_cell(cells, "l2-category") or _cell(cells, "L2-category"),
            )
        )
    if not items:
        raise DymuError(f"{tsv}: holds no rows; pass VLMEvalKit's MMBench TSV as downloaded")
    meta = {"dataset": tsv.stem, "source": tsv.name, "items": len(items), "made_by": "dymu data mmbench"}
    return write_data_file(out, meta, items)


def _captions(cell: str, where: str) -> list[str]:
    """A COCO_VAL `answer` cell: a Python or JSON list literal of captions (never eval'd)."""
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(cell)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    raise DymuError(f"{where}: the answer cell is not a list of caption strings; download the TSV again")


def _chooser(n: int | None, seed: int, what: str) -> Callable[[list[Any]], list[Any]]:
    """The subset rule, one for both sources: `sorted(random.Random(seed).sample(sorted_ids, n))`,
    so the same n and seed pick the same images on every machine and Python version."""

    def choose(ids: list[Any]) -> list[Any]:
        if n is None:
            return ids
        if not 0 < n <= len(ids):
            raise DymuError(f"{what}: --n {n} but it holds {len(ids)} images; pass 1 <= --n <= {len(ids)}")
        chosen = set(random.Random(seed).sample(ids, n))
        return [i for i in ids if i in chosen]

    return choose


def _coco_from_tsv(tsv: Path, out: Path, image_dir: Path, choose: Callable) -> list[dict[str, Any]]:
    rows = _extract(tsv, image_dir, ("index", "image", "answer"), choose=choose)
    items = []
    for row in rows:
        image_id = _cell(row.cells, "image_id")
        items.append(
            item(
                row.index,
                relative_to(row.image, out.parent),  # type: ignore[arg-type]
                COCO_PROMPT,
                "COCO_VAL",
                image_id=_index(image_id) if image_id is not None else row.index,
                references=_captions(row.cells["answer"], f"{tsv}: line {row.line} (index {row.index})"),
            )
        )
    return items


def _coco_from_captions(
    captions: Path, images: Path, out: Path, image_dir: Path | None, choose: Callable
) -> list[dict[str, Any]]:
    if not captions.is_file():
        raise DymuError(f"{captions}: captions file not found; pass COCO's annotations/captions_val2017.json")
    if not images.is_dir():
        raise DymuError(f"{images}: image folder not found; pass COCO's val2017/ folder with --images")
    try:
        doc = json.loads(captions.read_text(encoding="utf-8"))
        files = {int(im["id"]): str(im["file_name"]) for im in doc["images"]}
        refs: dict[int, list[str]] = {i: [] for i in files}
        for ann in doc["annotations"]:
            refs.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
    except (ValueError, UnicodeDecodeError) as err:
        raise DymuError(f"{captions}: not a COCO captions file ({err}); pass captions_val2017.json") from None
    except (KeyError, TypeError) as err:
        raise DymuError(
            f"{captions}: not a COCO captions file (no {err}); pass captions_val2017.json "
            '({"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]})'
        ) from None
    items = []
    for position, image_id in enumerate(choose(sorted(files))):
        source = images / files[image_id]
        if not source.is_file():
            raise DymuError(
                f"{source}: image {image_id} of {captions.name} not found; pass COCO's val2017/ folder"
            )
        if image_dir is not None:  # a self-contained copy, relocatable with the data file
            image_dir.mkdir(parents=True, exist_ok=True)
            target = image_dir / source.name
            write_atomic(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
            source = target
        items.append(
            item(
                position,
                relative_to(source, out.parent),
                COCO_PROMPT,
                "COCO_VAL",
                image_id=image_id,
                references=refs.get(image_id, []),
            )
        )
    return items


def import_coco(
    out: str | Path,
    *,
    tsv: str | Path | None = None,
    captions: str | Path | None = None,
    images: str | Path | None = None,
    n: int | None = None,
    seed: int = 42,
    image_dir: str | Path | None = None,
) -> Path:
    """COCO captioning -> a data file with the COCO prompt and each image's reference captions.

    From VLMEvalKit's `COCO_VAL.tsv` (images extracted to `image_dir`, default `<out stem>_images/`;
    index and image_id as in the TSV) or from COCO's `captions_val2017.json` with its image folder
    (images referenced where they are, or copied to `image_dir` when given; index 0..N-1 in image
    id order). `n` keeps `sorted(random.Random(seed).sample(sorted ids, n))`: the same subset for
    the same n and seed everywhere.
    """
    out = Path(out)
    if (tsv is None) == (captions is None) or (captions is None) != (images is None):
        raise DymuError(
            "dymu data coco: pass either --tsv COCO_VAL.tsv or both --captions FILE and --images DIR"
        )
    if tsv is not None:
        source = Path(tsv)
        folder = Path(image_dir) if image_dir is not None else _default_image_dir(out)
        items = _coco_from_tsv(source, out, folder, _chooser(n, seed, str(source)))
    else:
        source = Path(captions)  # type: ignore[arg-type]
        chooser = _chooser(n, seed, str(source))
        items = _coco_from_captions(
            source, Path(images), out, None if image_dir is None else Path(image_dir), chooser
        )  # type: ignore[arg-type]
    if not items:
        raise DymuError(f"{source}: holds no images; pass the full COCO_VAL.tsv or captions_val2017.json")
    meta = {"dataset": "COCO_VAL", "source": source.name, "items": len(items), "made_by": "dymu data coco"}
    if n is not None:
        meta |= {"n": n, "seed": seed}
    return write_data_file(out, meta, items)


def parser() -> argparse.ArgumentParser:
    """`dymu data {mmbench,coco}`."""
    top = argparse.ArgumentParser(prog="dymu data", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="source", required=True)
    mmb = sub.add_parser("mmbench", help="VLMEvalKit's MMBench TSV -> data file with answers")
    mmb.add_argument("--tsv", type=Path, required=True, help="e.g. LMUData/MMBench_DEV_EN.tsv")
    mmb.add_argument("--out", type=Path, required=True, help="the data file to write (JSON)")
    mmb.add_argument("--image-dir", type=Path, default=None, help="default: <out stem>_images/ next to --out")
    coco = sub.add_parser("coco", help="COCO_VAL.tsv, or captions_val2017.json + images -> data file")
    coco.add_argument("--tsv", type=Path, default=None, help="VLMEvalKit's LMUData/COCO_VAL.tsv")
    coco.add_argument("--captions", type=Path, default=None, help="COCO's annotations/captions_val2017.json")
    coco.add_argument("--images", type=Path, default=None, help="COCO's val2017/ folder (with --captions)")
    coco.add_argument("--out", type=Path, required=True, help="the data file to write (JSON)")
    coco.add_argument("--n", type=int, default=None, help="keep a reproducible subset of N images (e.g. 500)")
    coco.add_argument("--seed", type=int, default=42, help="the subset's random seed (default 42)")
    coco.add_argument(
        "--image-dir",
        type=Path,
        default=None,
        help="where images go: default <out stem>_images/ for --tsv; with --captions, copy them here",
    )
    return top


def main(argv: list[str] | None = None) -> int:
    """Run `dymu data ...` (argv without the `data`); DymuError propagates for the CLI to print."""
    args = parser().parse_args(argv)
    if args.source == "mmbench":
        out = import_mmbench(args.tsv, args.out, args.image_dir)
    else:
        out = import_coco(
            args.out, tsv=args.tsv, captions=args.captions, images=args.images, n=args.n, seed=args.seed,
            image_dir=args.image_dir,
        )  # fmt: skip
    doc = json.loads(out.read_text(encoding="utf-8"))
    first = doc["data"][0]["image_paths"][0]
    print(
        f"wrote {out}: {len(doc['data'])} {doc['meta']['dataset']} items (images like {first}, relative to {out.parent})"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
