"""Write a data file in the users' format with N images made from the packaged sample photos
(original, mirrored and cropped variants), for benchmark runs that need more samples than the
six photos, e.g. batch 8 on the GPU machine (which has no data sets):

    python scripts/variant_data.py OUT_DIR [--n 24]   ->  OUT_DIR/coco_variants.json + OUT_DIR/images/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageOps

from dymu.bench.data import COCO_PROMPT, SAMPLE_DATA, item, load_data_file, resolve_image, write_data_file

VARIANTS = ("original", "mirrored", "centre-crop", "corner-crop")


def variant(image: Image.Image, kind: str) -> Image.Image:
    w, h = image.size
    if kind == "mirrored":
        return ImageOps.mirror(image)
    if kind == "centre-crop":
        return image.crop((w // 6, h // 6, w - w // 6, h - h // 6))
    if kind == "corner-crop":
        return image.crop((0, 0, int(w * 0.6), int(h * 0.6)))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument(
        "--prompt",
        default=COCO_PROMPT,
        help="the text prompt of every item (default: the COCO caption prompt)",
    )
    args = parser.parse_args()
    sample = load_data_file(SAMPLE_DATA)
    photos = [
        (s.image_id, Image.open(resolve_image(s.image_paths[0], sample.path)).convert("RGB"))
        for s in sample.samples
    ]
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(args.n):
        name, photo = photos[i % len(photos)]
        kind = VARIANTS[(i // len(photos)) % len(VARIANTS)]
        rel = f"images/{name}-{kind}-{i}.jpg"
        variant(photo, kind).save(args.out / rel, quality=90)
        items.append(item(i, rel, args.prompt, "COCO_VAL", image_id=f"{name}-{kind}"))
    path = write_data_file(
        args.out / "coco_variants.json", {"made_by": "scripts/variant_data.py", "n": args.n}, items
    )
    print(json.dumps({"data_file": str(path), "items": len(items)}))


if __name__ == "__main__":
    main()
