"""The shapes task as benchmark data files, so `dymu bench` scores real answers on the tiny model.

Why: the packaged photos (`dymu/data/sample/`) are real but the tiny model knows nothing of them;
these files ask the trained tiny model what it was trained to see, in the two formats the users'
benchmark files use: MMBench DEV EN (multiple choice, scored by option letter) and COCO captions
(scored by BLEU/CIDEr against the true description). The committed copies under
`dymu/data/sample/shapes/` are what `python -m dymu.testing.shapes_data` writes (a test checks).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..bench.data import COCO_PROMPT, SAMPLE_SHAPES, SAMPLE_SHAPES_COCO, item, mmbench_prompt, write_data_file
from . import shapes

FOLDER = SAMPLE_SHAPES.parent
MMBENCH_FILE = SAMPLE_SHAPES.name
COCO_FILE = SAMPLE_SHAPES_COCO.name
N_IMAGES = 12
SEED = 31  # not the training stream's seeds, nor the golden test set's


def write(folder: Path = FOLDER, n_images: int = N_IMAGES, seed: int = SEED) -> list[Path]:
    """Pictures (`images/shapes-NN.png`) and both data files; returns the data files."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)  # option order
    kinds = list(shapes.CHOICE_QUESTIONS)
    mmbench, coco = [], []
    for i, (scene, picture) in enumerate(shapes.scenes(n_images, seed)):
        rel = f"images/shapes-{i:02d}.png"
        picture.save(folder / rel, format="PNG", optimize=False)
        kind = kinds[i % len(kinds)]
        options, letter = shapes.choice_options(scene, kind, rng)
        prompt = mmbench_prompt(shapes.CHOICE_QUESTIONS[kind], None, options)
        mmbench.append(item(i, rel, prompt, "MMBench_DEV_EN", image_id=f"shapes-{i:02d}", answer=letter,
                            options=options, category=kind, l2_category="shapes"))  # fmt: skip
        coco.append(item(i, rel, COCO_PROMPT, "COCO_VAL", image_id=f"shapes-{i:02d}",
                         references=[scene.answer("describe")]))  # fmt: skip
    about = "the tiny model's shapes task (dymu/testing/shapes.py), written by dymu/testing/shapes_data.py"
    return [
        write_data_file(folder / MMBENCH_FILE, {"dataset": "MMBench_DEV_EN", "items": len(mmbench), "about": about},
                        mmbench),
        write_data_file(folder / COCO_FILE, {"dataset": "COCO_VAL", "items": len(coco), "about": about}, coco),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dymu.testing.shapes_data", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=FOLDER)
    args = parser.parse_args(argv)
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
