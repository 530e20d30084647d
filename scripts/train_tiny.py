"""Train the embedded tiny LLaVA-1.5 on the shapes task and write `dymu/data/tiny_trained.safetensors`.

Why: the embedded model answers real questions (colour, shape and number of the objects in a
picture, `dymu.testing.shapes`), so `dymu infer` prints true answers and every matrix cell can
score accuracy, stock against DyMU. It starts from the deterministic random fixture
(`TinySpec(weights="random")`), trains every weight through the llava-hf checkpoint as loaded by
`dymu.load` (the model's own modules, no transformers training code), and writes the weights under
the fixture's canonical names, so `dymu.testing.tiny` builds both checkpoint formats from them.

What it learns, each item one generated picture and one prompt, all in LLaVA-1.5's templates
(`llava_v1` and `vicuna_v1`), the image token followed by the legacy family's extra dummy-prefix
token half the time (the liuhaotian tokenization has it, llava-hf's does not):
* the four `shapes.QUESTIONS` -> one-word or three-word answers;
* VLMEvalKit's COCO captioning prompt -> the describe answer ("two red circles");
* VLMEvalKit's MMBench prompt (question, 3 or 4 shuffled options) -> the option letter.

Seeded and single-threaded on the CPU: the same stack gives the same weights. Different torch
builds may differ in the last bits; the committed file is the artifact, this script its recipe.

    python scripts/train_tiny.py [--steps 4000 --batch 48 --lr 3e-3] [--out dymu/data/tiny_trained.safetensors]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import dymu
from dymu.api import format_prompt
from dymu.bench.data import COCO_PROMPT, mmbench_prompt
from dymu.families import split_at_image
from dymu.testing import shapes
from dymu.testing.tiny import HF_SAFETENSORS, TEXT_VOCAB_SIZE, TinySpec, ensure_tiny_checkpoints

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "dymu" / "data" / "tiny_trained.safetensors"
LEGACY_EXTRA = 456  # "▁": the liuhaotian tokenization restarts the text after <image> with a dummy prefix
CONVS = ("llava_v1", "vicuna_v1")


def example(rng: np.random.Generator) -> tuple[shapes.Scene, object, str, str]:
    """(scene, picture, prompt, answer) for one training item."""
    scene = shapes.random_scene(rng)
    image = shapes.draw(scene, rng)
    conv = CONVS[int(rng.integers(len(CONVS)))]
    form = rng.choice(["chat", "chat", "caption", "mc"])
    if form == "chat":
        kind = list(shapes.QUESTIONS)[int(rng.integers(len(shapes.QUESTIONS)))]
        return scene, image, format_prompt(shapes.QUESTIONS[kind], conv), scene.answer(kind)
    if form == "caption":
        return scene, image, format_prompt(COCO_PROMPT, conv), scene.answer("describe")
    kind = list(shapes.CHOICE_QUESTIONS)[int(rng.integers(len(shapes.CHOICE_QUESTIONS)))]
    options, letter = shapes.choice_options(scene, kind, rng)
    prompt = mmbench_prompt(shapes.CHOICE_QUESTIONS[kind], None, options)
    return scene, image, format_prompt(prompt, conv), letter


class Batcher:
    """Token ids, labels and pixels for a batch, with the image token placeholder expanded."""

    def __init__(self, model: dymu.DymuLlava, n_image_tokens: int) -> None:
        self.model = model
        self.n_image = n_image_tokens
        self.image_id = model.parts.image_token_id
        self.pad = int(model.tokenizer.pad_token_id or 0)
        self.eos = int(model.tokenizer.eos_token_id)
        self._ids: dict[str, tuple[list[int], list[int]]] = {}

    def _split(self, prompt: str) -> tuple[list[int], list[int]]:
        if prompt not in self._ids:
            self._ids[prompt] = split_at_image(self.model.tokenize(prompt))
        return self._ids[prompt]

    def __call__(self, items: list[tuple], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for _, _, prompt, answer in items:
            before, after = self._split(prompt)
            if rng.random() < 0.5:
                after = [LEGACY_EXTRA, *after]
            target = [*self.model.tokenizer.encode(answer, add_special_tokens=False), self.eos]
            ids = before + [self.image_id] * self.n_image + after + target
            rows.append(ids)
            labels.append([-100] * (len(ids) - len(target)) + target)
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            label_ids[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        pixels = self.model.pixel_values([it[1] for it in items])
        return {"input_ids": input_ids, "labels": label_ids, "attention_mask": mask, "pixel_values": pixels}


def loss_of(parts, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Stock LLaVA-1.5's forward from the model's modules, next-token cross-entropy on the answers."""
    hidden = parts.vision(batch["pixel_values"], output_hidden_states=True).hidden_states[parts.feature_layer]
    features = parts.projector(hidden[:, 1:])  # "patch": CLS dropped
    ids = batch["input_ids"]
    is_image = ids == parts.image_token_id
    embeds = parts.decoder.embed_tokens(ids.masked_fill(is_image, 0))
    embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))
    out = parts.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    logits = parts.lm_head(out.last_hidden_state[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def canonical_state(parts) -> dict[str, torch.Tensor]:
    """The trained weights under the fixture's names (`dymu.testing.tiny.parameter_inits`)."""
    out = {f"vision_model.{k.removeprefix('vision_model.')}": v for k, v in parts.vision.state_dict().items()}
    proj = parts.projector.state_dict()
    for src, dst in (("linear_1", "model.mm_projector.0"), ("linear_2", "model.mm_projector.2")):
        for leaf in ("weight", "bias"):
            out[f"{dst}.{leaf}"] = proj[f"{src}.{leaf}"]
    for k, v in parts.decoder.state_dict().items():
        if "rotary_emb" not in k:
            out[f"model.{k}"] = v
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"][:TEXT_VOCAB_SIZE]
    out["lm_head.weight"] = parts.lm_head.weight[:TEXT_VOCAB_SIZE]
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in sorted(out.items())}


def quick_eval(model: dymu.DymuLlava, n_images: int) -> str:
    """Accuracy overall and per question kind on pictures that are not the golden test set's."""
    items = shapes.test_set(n_images, seed=shapes.TEST_SEED + 1)
    answers = [a.text for a in model.generate([format_prompt(it.question) for it in items],
                                              [it.image for it in items], max_new_tokens=16)]  # fmt: skip
    kinds = shapes.accuracy_by_kind(answers, items)
    return f"{shapes.accuracy(answers, items):.3f} " + " ".join(f"{k} {v:.2f}" for k, v in kinds.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--device", default="cpu", help="cpu (the recipe of the committed weights) or cuda (sweeps)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    spec = TinySpec(weights="random")
    model = dymu.load(ensure_tiny_checkpoints(spec=spec)[HF_SAFETENSORS], device=args.device)
    parts = model.parts
    params = [p for p in parts.model.parameters()]
    for p in params:
        p.requires_grad_(True)
    for table in (parts.decoder.embed_tokens.weight, parts.lm_head.weight):  # padded rows stay zero
        keep = torch.ones_like(table)  # on the table's device
        keep[TEXT_VOCAB_SIZE:] = 0
        with torch.no_grad():
            table[TEXT_VOCAB_SIZE:] = 0
        table.register_hook(lambda g, keep=keep: g * keep)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    batcher = Batcher(model, spec.num_patches)
    rng = np.random.default_rng(args.seed + 1)
    start, running = time.time(), None
    parts.model.train()
    for step in range(args.steps):
        batch = {
            k: v.to(args.device) for k, v in batcher([example(rng) for _ in range(args.batch)], rng).items()
        }
        loss = loss_of(parts, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  {time.time() - start:6.0f} s", flush=True)
    parts.model.eval()
    with torch.no_grad():
        print(f"held-out accuracy (stock, {4 * 16} questions): {quick_eval(model, 16)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(canonical_state(parts), str(args.out), metadata={"format": "pt", "recipe": "scripts/train_tiny.py",
              "steps": str(args.steps), "seed": str(args.seed)})  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
