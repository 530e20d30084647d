"""The README runs as written (issue 13, item 2): every shell and Python block in README.md is
run here on the tiny model on CPU, or is marked in the README itself, visibly, with the reason it
is not (or which command of it is), so the README cannot drift from the code again.

Markers (the paragraph right above a block):
- `_Not run by the README test: <reason>._` - the block is skipped;
- `... runs `<command>` from this block ...` - only that command (it must be in the block) runs.
Python blocks run with the substitutions the README names above them (tiny llava-hf directory,
official-format thresholds calibrated for it, a sample picture, cpu, float32).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch

from dymu.testing.sample_images import make_sample_images

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"bash", "sh", "shell", "console", "python"}
SKIP = re.compile(r"^_Not run by the README test: (?P<reason>.+)\._$", re.S)
PARTLY = re.compile(r"runs `(?P<command>[^`]+)` from this block")


def blocks(text: str) -> list[dict]:
    """Fenced blocks with their language, body, line and the paragraph just above them."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang, start = lines[i][3:].strip(), i
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            above, k = [], start - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            while k >= 0 and lines[k].strip() and not lines[k].startswith("```"):
                above.insert(0, lines[k].strip())
                k -= 1
            out.append({"lang": lang, "body": "\n".join(lines[start + 1 : end]), "line": start + 1,
                        "above": " ".join(above)})  # fmt: skip
            i = end + 1
        else:
            i += 1
    return out


def plan(block: dict) -> tuple[str, str]:
    """('skip', reason) / ('partly', command) / ('run', '') for one block, from its marker."""
    skip = SKIP.match(block["above"])
    if skip:
        return "skip", skip["reason"]
    partly = PARTLY.search(block["above"])
    if partly:
        return "partly", partly["command"]
    return "run", ""


README_BLOCKS = blocks(README.read_text(encoding="utf-8"))
CODE = [b for b in README_BLOCKS if b["lang"] in RUNNABLE]


def test_every_block_is_run_or_marked_with_a_reason() -> None:
    assert all(b["lang"] for b in README_BLOCKS), "a fence without a language: say text, bash or python"
    assert len(CODE) >= 4, "the README's code blocks were not found"
    for block in CODE:
        kind, detail = plan(block)
        if kind == "skip":
            assert len(detail) > 20, f"README line {block['line']}: say why the block is not run"
        if kind == "partly":
            assert detail in block["body"], f"README line {block['line']}: `{detail}` is not in the block"
    first = CODE[0]
    assert "-m dymu infer" in first["body"] and "-m nox -s tests" in first["body"], (
        "the first two commands moved"
    )
    assert plan(first)[0] != "skip", "the main job must be run"
    assert sum(plan(b)[0] == "run" for b in CODE) >= 3


def _shell_commands(block: dict) -> list[list[str]]:
    """The block's commands as argv lists (comments dropped, `&&` chains split), selected by its
    marker; `python3.11` and a bare `dymu` run in this test's interpreter."""
    kind, only = plan(block)
    text = block["body"].replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1 :]
    if kind == "partly":
        commands = [c for c in commands if " ".join(c) == only]
        assert commands, f"`{only}` is not a whole command of the block"
    return [[sys.executable, *c[1:]] if c[0].startswith("python") else [sys.executable, "-m", "dymu", *c[1:]]
            if c[0] == "dymu" else c for c in commands]  # fmt: skip


SHELL = [b for b in CODE if b["lang"] != "python" and plan(b)[0] != "skip"]
PYTHON = [b for b in CODE if b["lang"] == "python" and plan(b)[0] != "skip"]


@pytest.mark.parametrize("block", SHELL, ids=[f"line{b['line']}" for b in SHELL])
def test_shell_block_runs(block: dict, tmp_path) -> None:
    for argv in _shell_commands(block):
        assert argv[0] == sys.executable, f"README line {block['line']}: {argv[0]} is neither python nor dymu"
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        assert done.returncode == 0, (
            f"README line {block['line']}: {' '.join(argv[1:])}\n{done.stderr[-2000:]}"
        )
        assert "Traceback" not in done.stderr and "nan" not in done.stdout.split()
        if argv[1:3] == ["-m", "dymu"] and argv[3] == "infer":
            answers = [ln for ln in done.stdout.splitlines() if "visual tokens]" in ln]
            assert len(answers) == 3, done.stdout
        if argv[1:3] == ["-m", "dymu"] and argv[3] == "bench":
            report = json.loads((tmp_path / "report_dymu.json").read_text())
            assert set(report["modes"]) == {"stock", "dymu"}


@pytest.fixture(scope="module")
def substitutions(tiny_checkpoints, calibrated, tmp_path_factory) -> dict[str, str]:
    """What the README says it swaps: the tiny llava-hf directory, its thresholds in the official
    `.pth` layout (read through the same loader as the real file), a sample picture, cpu, float32."""
    folder = tmp_path_factory.mktemp("readme")
    pth = folder / "tiny-tome.pth"
    torch.save(
        {f"module.visual.transformer.resblocks.{i}.threshold": t.clone() for i, t in enumerate(calibrated)},
        pth,
    )
    photo = folder / "photo.jpg"
    make_sample_images(1)[0].convert("RGB").save(photo)
    return {
        '"path/to/llava-v1.5-7b-hf"': repr(str(tiny_checkpoints["llava-hf-tiny-safetensors"])),
        '"ViT-L-14-336-tome-72out.pth"': repr(str(pth)),
        '"photo.jpg"': repr(str(photo)),
        '"cuda"': '"cpu"',
        "torch.float16": "torch.float32",
    }


@pytest.mark.parametrize("block", PYTHON, ids=[f"line{b['line']}" for b in PYTHON])
def test_python_block_runs(block: dict, substitutions) -> None:
    code = block["body"]
    for old, new in substitutions.items():
        code = code.replace(old, new)
    assert '"path/to' not in code and '"cuda"' not in code, "a placeholder the test does not swap"
    namespace: dict = {}
    exec(compile(code, f"README.md:{block['line']}", "exec"), namespace)
    model = namespace["model"]
    assert model.thresholds is not None and torch.isfinite(model.thresholds).any()  # DyMU merges
    if "stock" in namespace:
        assert namespace["stock"].thresholds is None  # thresholds=None is stock LLaVA
        assert 0 < namespace["answers"][0].visual_tokens < 64  # merged: fewer than the 64 patches
        assert namespace["plain"].options.cuda_graphs is False
