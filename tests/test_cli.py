"""The CLI: the embedded default runs; bad input gets one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import warnings

import pytest
import torch

from dymu.cli import add_option_flags, main, options_from
from dymu.options import Options
from dymu.quiet import quiet_libraries
from dymu.testing.sample_images import make_sample_images


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_infer_on_the_embedded_tiny_model(capsys) -> None:
    code, out, _ = _run(capsys, "infer", "--max-new-tokens", "3", "--json")
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["family"] == "hf" and report["dymu"] is True
    tokens = [r["visual_tokens"] for r in report["results"]]
    assert len(tokens) == 3 and all(0 < t < 64 for t in tokens)
    assert all(len(r["token_ids"]) == 3 for r in report["results"])


def _bad_dirs(tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    no_weights = tmp / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "llava"}))
    bert = tmp / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    image = tmp / "not-an-image.png"
    image.write_text("hello")
    return {"no_weights": no_weights, "bert": bert, "broken": broken, "image": image}


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing", "model path does not exist"),
        ("no_weights", "no model weights"),
        ("bert", "unsupported model_type 'bert'"),
        ("broken", "malformed JSON"),
        ("image", "not a readable image"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, tiny_checkpoints, case, pattern) -> None:
    dirs = _bad_dirs(tmp_path)
    good_model = str(tiny_checkpoints["llava-hf-tiny-safetensors"])
    good_image = str(tmp_path / "ok.png")

    make_sample_images(1)[0].save(good_image)
    model = {"missing": str(tmp_path / "nope"), "image": good_model}.get(case, str(dirs.get(case, "")))
    image = str(dirs["image"]) if case == "image" else good_image
    code, _out, err = _run(capsys, "infer", "--model-path", model, "--image", image, "--max-new-tokens", "2")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dymu: error: "), err
    assert pattern in lines[0]


def test_bad_thresholds_file_via_cli(capsys, tmp_path) -> None:
    bad = tmp_path / "t.json"
    bad.write_text("[1, 2")
    code, _, err = _run(capsys, "infer", "--thresholds", str(bad), "--max-new-tokens", "1")
    assert code == 2 and "malformed JSON" in err and len(err.strip().splitlines()) == 1


def test_convert_bin_to_safetensors(capsys, tmp_path, tiny_checkpoints) -> None:
    dst = tmp_path / "converted"
    code, _out, _ = _run(capsys, "convert", str(tiny_checkpoints["llava-hf-tiny-bin"]), str(dst))
    assert code == 0 and (dst / "model.safetensors").is_file() and not list(dst.glob("*.bin"))
    code, _, err = _run(capsys, "convert", str(tiny_checkpoints["llava-hf-tiny-bin"]), str(dst))
    assert code == 2 and "already exists" in err


class _TouchOnLoad:
    """Unpickles to a call that creates `marker`: proof that loading ran pickled code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "second-of-two-shards"])
def test_convert_refuses_a_bin_carrying_pickled_code(capsys, tmp_path, tiny_checkpoints, sharded) -> None:
    """`weights_only=True` refuses the payload; convert must stop there (exit 2, one line), write no
    output directory and never run the payload, also when the refused file is a later shard."""
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoints["llava-hf-tiny-bin"], src)
    marker = tmp_path / "payload-ran"
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    if sharded:
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                  "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}  # fmt: skip
        (src / "pytorch_model.bin").unlink()
        for i, (file, names) in enumerate(shards.items()):
            part = {k: state[k] for k in names}
            torch.save({**part, "evil": _TouchOnLoad(marker)} if i == 1 else part, src / file)
        weight_map = {k: file for file, names in shards.items() for k in names}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save({**state, "evil": _TouchOnLoad(marker)}, src / "pytorch_model.bin")
    dst = tmp_path / "out"
    code, _out, err = _run(capsys, "convert", str(src), str(dst))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dymu: error: "), err
    assert "cannot be read as plain tensors" in lines[0] and "refusing it" in lines[0]
    assert not dst.exists() and not list(tmp_path.glob("out*")), "no output directory, not even a partial one"
    assert not marker.exists(), "the pickled payload ran"


def test_the_cli_drops_only_the_legacy_packages_future_warnings() -> None:

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        for module, category in (("llava.model.language_model.llava_llama", FutureWarning),
                                 ("llava_other_pkg", FutureWarning), ("dymu.generation", FutureWarning),
                                 ("llava.model.builder", UserWarning)):  # fmt: skip
            warnings.warn_explicit("planted", category, "x.py", 1, module=module)
    assert sorted((w.category.__name__, w.filename) for w in seen) == [
        ("FutureWarning", "x.py"), ("FutureWarning", "x.py"), ("UserWarning", "x.py")]  # fmt: skip


def test_every_fast_path_flag_flips_its_option() -> None:
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    assert options_from(parser.parse_args([])) == Options()
    flags = {"--no-fused-rope": "fused_rope", "--no-fused-rows": "fused_rows",
             "--no-fused-remerge": "fused_remerge", "--no-kv-sink": "kv_sink", "--no-cuda-graphs": "cuda_graphs",
             "--no-compile-tower": "compile_tower"}  # fmt: skip
    for flag, field in flags.items():
        got = options_from(parser.parse_args([flag]))
        assert getattr(got, field) is not getattr(Options(), field)
        assert {k: v for k, v in vars(got).items() if k != field} == {
            k: v for k, v in vars(Options()).items() if k != field
        }
