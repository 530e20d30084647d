"""Bad input, as a new user would give it: every case is one line on stderr, `dymu: error: <thing>:
<problem>; <fix>`-shaped, exit code 2, no traceback. A table of (name, setup, argv, first-line
pattern), plus a fuzz test that feeds corrupted bytes of real files to the loaders."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import dymu
from dymu.checkpoints import check_weights
from dymu.cli import main
from dymu.errors import DymuError
from dymu.images import load_image

Setup = Callable[[Path, dict], list[str]]


def _copy(tiny: dict, name: str, tmp: Path) -> Path:
    dst = tmp / name
    shutil.copytree(tiny[name], dst)
    return dst


def _json_not_object(tmp: Path, tiny: dict) -> list[str]:
    d = tmp / "m"
    d.mkdir()
    (d / "config.json").write_text("[1, 2, 3]")
    return ["infer", "--model-path", str(d), "--image", str(tiny["image"])]


def _safetensors(content: Callable[[bytes], bytes]) -> Setup:
    def setup(tmp: Path, tiny: dict) -> list[str]:
        d = _copy(tiny, "llava-hf-tiny-safetensors", tmp)
        weights = d / "model.safetensors"
        weights.write_bytes(content(weights.read_bytes()))
        return ["infer", "--model-path", str(d), "--image", str(tiny["image"])]

    return setup


def _garbage_bin(tmp: Path, tiny: dict) -> list[str]:
    d = _copy(tiny, "llava-hf-tiny-bin", tmp)
    (d / "pytorch_model.bin").write_bytes(b"\x00garbage" * 100)
    return ["infer", "--model-path", str(d), "--image", str(tiny["image"])]


class _Evil:
    def __reduce__(self):
        return (print, ("payload ran",))


def _refused_pickle(tmp: Path, tiny: dict) -> list[str]:
    d = _copy(tiny, "llava-hf-tiny-bin", tmp)
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": _Evil()}, d / "pytorch_model.bin")
    return ["infer", "--model-path", str(d), "--image", str(tiny["image"])]


def _calibrate_without_weights(tmp: Path, tiny: dict) -> list[str]:
    d = _copy(tiny, "llava-hf-tiny-safetensors", tmp)
    (d / "model.safetensors").unlink()
    return [
        "calibrate",
        "--model",
        str(d),
        "--images",
        str(tiny["image"].parent),
        "--out",
        str(tmp / "t.json"),
    ]


def _index(weight_map: object) -> Setup:
    def setup(tmp: Path, tiny: dict) -> list[str]:
        d = _copy(tiny, "llava-hf-tiny-bin", tmp)
        (d / "pytorch_model.bin.index.json").write_text(json.dumps(weight_map) if weight_map else "{broken")
        return ["convert", str(d), str(tmp / "out")]

    return setup


def _wrong_family(tmp: Path, tiny: dict) -> list[str]:
    return ["infer", "--family", "hf", "--model-path", str(tiny["llava-v1.5-tiny-safetensors"]),
            "--image", str(tiny["image"])]  # fmt: skip


def _config_not_for_weights(tmp: Path, tiny: dict) -> list[str]:
    d = _copy(tiny, "llava-hf-tiny-safetensors", tmp)
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["hidden_size"] = 4096  # a 7B config next to tiny weights
    (d / "config.json").write_text(json.dumps(config))
    return ["infer", "--model-path", str(d), "--image", str(tiny["image"])]


def _thresholds(
    tensor: torch.Tensor | None = None, text: str | None = None, suffix: str = ".safetensors"
) -> Setup:
    def setup(tmp: Path, tiny: dict) -> list[str]:
        path = tmp / f"t{suffix}"
        if text is not None:
            path.write_text(text)
        elif suffix == ".pth":
            torch.save({"state_dict": {f"visual.transformer.resblocks.{i}.threshold": v for i, v in enumerate(tensor)}},
                       path)  # fmt: skip
        else:
            save_file({"thresholds": tensor}, str(path))
        return ["infer", "--thresholds", str(path), "--max-new-tokens", "2"]

    return setup


def _plain(*argv: str) -> Setup:
    return lambda tmp, tiny: [a.replace("{tmp}", str(tmp)) for a in argv]


CASES: list[tuple[str, Setup, str]] = [
    ("config.json not an object", _json_not_object, r"config\.json: expected a JSON object"),
    (
        "0-byte model.safetensors",
        _safetensors(lambda b: b""),
        r"model\.safetensors: not a readable safetensors",
    ),
    ("truncated model.safetensors", _safetensors(lambda b: b[: len(b) // 3]), r"not a readable safetensors"),
    ("garbage model.safetensors", _safetensors(lambda b: b"\xff" * 64), r"not a readable safetensors"),
    ("garbage pytorch_model.bin", _garbage_bin, r"(not a torch checkpoint|only \.bin weights)"),
    ("refused pickle in .bin", _refused_pickle, r"(were not unpickled|only \.bin weights)"),
    ("calibrate on a dir without weights", _calibrate_without_weights, r"no model weights"),
    ("malformed shard index", _index(None), r"not a shard index"),
    ("shard outside the directory", _index({"weight_map": {"w": "../../../etc/passwd"}}), r"points outside"),
    ("--family hf on a liuhaotian dir", _wrong_family, r"describes a legacy checkpoint, not hf"),
    ("config that does not fit the weights", _config_not_for_weights, r"does not belong to these weights"),
    (
        "negative -inf threshold",
        _thresholds(torch.tensor([0.9, -float("inf"), 0.5, 0.4])),
        r"outside \[-1, 1\]",
    ),
    ("threshold above 1", _thresholds(torch.tensor([0.9, 2.0, 0.5, 0.4])), r"outside \[-1, 1\]"),
    ("int64 thresholds", _thresholds(torch.tensor([1, 0, 0, 0])), r"torch\.int64, not floats"),
    ("bool thresholds", _thresholds(torch.tensor([True, False, True, False])), r"not floats"),
    ("2-D thresholds", _thresholds(torch.ones(2, 4) * 0.5), r"not one number per layer"),
    ("integer .pth thresholds", _thresholds(torch.tensor([1, 1, 1, 1]), suffix=".pth"), r"not a float"),
    ("per-layer vectors in .pth", _thresholds(torch.ones(4, 3) * 0.5, suffix=".pth"), r"not one number"),
    ("a text file named .pth", _thresholds(text="hello", suffix=".pth"), r"refused to load"),
    ("--max-new-tokens 0", _plain("infer", "--max-new-tokens", "0"), r"must be at least 1"),
    ("--max-new-tokens -3", _plain("infer", "--max-new-tokens", "-3"), r"must be at least 1"),
    (
        "--max-new-tokens past the context",
        _plain("infer", "--max-new-tokens", "100000"),
        r"model's context is",
    ),
    ("--dtype int8", _plain("infer", "--dtype", "int8"), r"not a floating-point torch dtype"),
    ("--device bogus", _plain("infer", "--device", "gpu7"), r"--device 'gpu7': not a device"),
    (
        "--target-tokens 0",
        _plain("calibrate", "--target-tokens", "0", "--out", "{tmp}/t.safetensors"),
        r"target_tokens=0 must be in 1\.\.64",
    ),
    (
        "calibrate --batch-size 0",
        _plain("calibrate", "--batch-size", "0"),
        r"--batch-size 0: must be at least 1",
    ),
    (
        "calibrate --out into a missing folder",
        _plain("calibrate", "--out", "{tmp}/nope/t.safetensors"),
        r"does not exist; create it first",
    ),
    ("calibrate --out onto a directory", _plain("calibrate", "--out", "{tmp}"), r"is a directory"),
    (
        "bench --batch-size 0",
        _plain("bench", "--batch-size", "0", "--report-file", "{tmp}/r.json"),
        r"must be >= 1",
    ),
    (
        "bench on a missing data file",
        _plain("bench", "--data-file", "{tmp}/none.json", "--report-file", "{tmp}/r.json"),
        r"none\.json",
    ),
]
if not torch.cuda.is_available():
    CASES.append(
        ("--device cuda without CUDA", _plain("infer", "--device", "cuda"), r"CUDA is not available here")
    )


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, tmp_path_factory) -> dict:
    image = tmp_path_factory.mktemp("img") / "photo.png"
    Image.new("RGB", (40, 30), (120, 30, 200)).save(image)
    return {**tiny_checkpoints, "image": image}


@pytest.mark.parametrize(("name", "setup", "pattern"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(name, setup, pattern, tiny, tmp_path, capsys) -> None:
    argv = setup(tmp_path, tiny)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, out[-500:], err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("dymu: error: "), err[-2000:]
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert "payload ran" not in out


def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x the limit: PIL's bomb error
    with pytest.raises(DymuError, match=r"big\.png: image too large to decode safely"):
        load_image(path)


def test_a_16_bit_png_is_scaled_not_whitened(tmp_path) -> None:
    import numpy as np

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    pixels = np.asarray(load_image(tmp_path / "ramp.png"))
    want = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert pixels.shape == (64, 64, 3) and np.abs(pixels[..., 0].astype(int) - want).max() <= 1
    assert 120 < pixels.mean() < 135  # a ramp, not a white square (PIL's own convert gives ~254)


def test_api_misuse_gets_a_dymu_error(tiny) -> None:
    with pytest.raises(DymuError, match=r"expected a loaded LLaVA-1\.5 model"):
        dymu.apply(object(), None)
    model = dymu.load(tiny["llava-hf-tiny-safetensors"])
    bare = dymu.apply(model.model, None)
    with pytest.raises(DymuError, match="no tokenizer"):
        bare.generate(dymu.format_prompt("hi"), tiny["image"])
    with pytest.raises(DymuError, match=r"expected a non-empty \(N, 3, 112, 112\) batch"):
        dymu.encode_images(model.parts.vision, torch.zeros(3, 112, 112), None)
    with pytest.raises(DymuError, match="non-empty"):
        dymu.encode_images(model.parts.vision, torch.zeros(0, 3, 112, 112), None)
    with pytest.raises(DymuError, match="batch_size=0"):
        dymu.calibrate(model.parts.vision, torch.zeros(2, 3, 112, 112), batch_size=0)
    with pytest.raises(DymuError, match="empty pixel tensor"):
        dymu.calibrate(model.parts.vision, torch.zeros(0, 3, 112, 112))
    with pytest.raises(DymuError, match="outside"):
        dymu.apply(model.model, [0.5, -3.0, 0.5, 0.5], tokenizer=model.tokenizer)


def test_the_command_line_prints_one_line_from_a_fresh_interpreter(tmp_path) -> None:
    """In a new process, so import-time warnings of the installed transformers would show too."""
    done = subprocess.run([sys.executable, "-m", "dymu", "bench", "tower", "--dtype", "int8", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "dymu: error: --dtype 'int8': not a floating-point torch dtype; use float32, bfloat16 or float16"]  # fmt: skip


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.choice(["flip", "truncate", "zero", "splice"])
    if kind == "truncate":
        return bytes(out[: rng.randrange(len(out))])
    for _ in range(rng.randint(1, 16)):
        i = rng.randrange(len(out))
        out[i] = 0 if kind == "zero" else rng.randrange(256)
    if kind == "splice":
        i = rng.randrange(len(out))
        out[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(out)


def test_corrupted_files_load_or_fail_with_one_line(tiny, tmp_path) -> None:
    """Random corruptions of a real checkpoint, image and thresholds files: a loader either
    succeeds or raises DymuError; anything else (a traceback) fails."""
    rng = random.Random(0)
    checkpoint = _copy(tiny, "llava-hf-tiny-safetensors", tmp_path)
    weights = (checkpoint / "model.safetensors").read_bytes()
    image_bytes = (tiny["image"]).read_bytes()
    tau = tmp_path / "tau.safetensors"
    save_file({"thresholds": torch.tensor([0.9, 0.8, 0.7, float("inf")])}, str(tau))
    tau_bytes, tau_json = tau.read_bytes(), json.dumps({"thresholds": [0.9, 0.8, 0.7, 0.6]}).encode()
    outcomes = {"ok": 0, "refused": 0}
    for trial in range(40):
        (checkpoint / "model.safetensors").write_bytes(_corrupt(weights, rng))
        (tmp_path / "img.png").write_bytes(_corrupt(image_bytes, rng))
        tau.write_bytes(_corrupt(tau_bytes, rng))
        (tmp_path / "tau.json").write_bytes(_corrupt(tau_json, rng))
        for load in (lambda: check_weights(checkpoint), lambda: load_image(tmp_path / "img.png"),
                     lambda: dymu.load_thresholds(tau, num_layers=4),
                     lambda: dymu.load_thresholds(tmp_path / "tau.json", num_layers=4)):  # fmt: skip
            try:
                load()
                outcomes["ok"] += 1
            except DymuError as err:
                assert "\n" not in str(err), (trial, str(err))
                outcomes["refused"] += 1
    assert outcomes["refused"] > 40, outcomes  # the corruptions were real
