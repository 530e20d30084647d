"""Threshold files: the official .pth, our safetensors, JSON, and bad files."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from safetensors.torch import save_file

import dymu
from dymu import DymuError
from dymu.thresholds import save_thresholds, threshold_metadata, validate_thresholds


class _Evil:
    """Pickles to a call that would create a marker file if it were ever unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _official_state(n: int = 24, prefix: str = "module.") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    state = {
        f"{prefix}visual.conv1.weight": torch.randn(8, 3, 2, 2, generator=gen),
        f"{prefix}visual.class_embedding": torch.randn(8, generator=gen),
        f"{prefix}transformer.resblocks.0.attn.in_proj_weight": torch.randn(24, 8, generator=gen),
        f"{prefix}logit_scale": torch.tensor(4.6),
    }
    for i in range(n):
        state[f"{prefix}visual.transformer.resblocks.{i}.threshold"] = torch.tensor(0.5 + i / 100).to(
            torch.bfloat16
        )
        state[f"{prefix}visual.transformer.resblocks.{i}.attn.out_proj.weight"] = torch.randn(
            8, 8, generator=gen
        )
    return state


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_official_pth_returns_24_thresholds(tmp_path: pathlib.Path, prefix: str) -> None:
    path = tmp_path / "ViT-L-14-336-tome-72out.pth"
    torch.save({"name": "ViT-L-14-336-tome-72out", "state_dict": _official_state(prefix=prefix)}, path)
    tau = dymu.load_thresholds(path, num_layers=24)
    want = torch.tensor([0.5 + i / 100 for i in range(24)]).to(torch.bfloat16).float()
    assert tau.dtype == torch.float32
    assert torch.equal(tau, want)


def test_pickled_callable_is_refused_not_executed(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"name": "x", "state_dict": _official_state(), "payload": _Evil(marker)}, path)
    with pytest.raises(DymuError, match="refused") as err:
        dymu.load_thresholds(path)
    assert not marker.exists()
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_wrong_length_nan_and_missing_name_the_file(tmp_path: pathlib.Path) -> None:
    short = tmp_path / "short.pth"
    torch.save({"name": "x", "state_dict": _official_state(n=12)}, short)
    with pytest.raises(DymuError, match=r"short\.pth: has 12 thresholds but the vision tower has 24"):
        dymu.load_thresholds(short, num_layers=24)

    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps([0.9, float("nan"), 0.8]))
    with pytest.raises(DymuError, match=r"nan\.json: thresholds at layers \[1\] are outside \[-1, 1\]"):
        dymu.load_thresholds(nan)

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(DymuError, match=r"missing\.safetensors: thresholds file not found"):
        dymu.load_thresholds(missing)

    for bad, text in (("bad.json", "{not json"), ("bad.safetensors", "garbage"), ("bad.pth", "garbage")):
        (tmp_path / bad).write_text(text)
        with pytest.raises(DymuError) as err:
            dymu.load_thresholds(tmp_path / bad)
        assert bad in str(err.value) and "\n" not in str(err.value)


def test_safetensors_and_json_round_trip(tmp_path: pathlib.Path) -> None:
    tau = torch.tensor([0.91, 0.8, 0.75, math.inf])
    path = dymu.save_thresholds(tmp_path / "t.safetensors", tau, target_tokens=16, source_model="tiny")
    assert torch.equal(dymu.load_thresholds(path), tau)

    meta = threshold_metadata(path)
    assert meta["target_tokens"] == "16" and meta["source_model"] == "tiny"

    finite = tau[:3]
    jpath = dymu.save_thresholds(tmp_path / "t.json", finite, note="x")
    assert torch.equal(dymu.load_thresholds(jpath), finite)
    with pytest.raises(DymuError, match="infinite"):
        dymu.save_thresholds(tmp_path / "inf.json", tau)


def _refusal(path: pathlib.Path, **kw) -> str:
    with pytest.raises(DymuError) as err:
        dymu.load_thresholds(path, **kw)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    return message


def test_every_official_layout_loads_and_every_wrong_one_says_what_is_wrong(tmp_path: pathlib.Path) -> None:
    """Flat dicts (no `state_dict` wrapper) and a `thresholds` entry load; a list, no threshold
    entries and gaps in the layer numbers each get their own one-line reason."""
    flat = tmp_path / "flat.pth"
    torch.save(_official_state(n=3, prefix=""), flat)
    assert dymu.load_thresholds(flat).shape == (3,)
    entry = tmp_path / "entry.pth"
    torch.save({"state_dict": {"thresholds": torch.tensor([0.25, 0.5])}}, entry)
    assert dymu.load_thresholds(entry).tolist() == [0.25, 0.5]
    as_list = tmp_path / "list.pth"
    torch.save([0.1, 0.2], as_list)
    assert "expected a dict with a 'state_dict'" in _refusal(as_list)
    empty = tmp_path / "empty.pth"
    torch.save({"state_dict": {"visual.conv1.weight": torch.ones(1)}}, empty)
    assert "no 'visual.transformer.resblocks.<i>.threshold' entries" in _refusal(empty)
    gap = tmp_path / "gap.pth"
    state = _official_state(n=4, prefix="")
    del state["visual.transformer.resblocks.1.threshold"]
    torch.save(state, gap)
    assert "threshold layers [0, 2, 3] are not 0..2;" in _refusal(gap)


@pytest.mark.parametrize("text, first", [("", "RuntimeError"), ("first line\nsecond line", "first line")])
def test_a_refused_pth_names_the_loaders_first_line_or_its_error_type(
    tmp_path, monkeypatch, text, first
) -> None:
    path = tmp_path / "x.pth"
    path.write_bytes(b"not a checkpoint")

    def refuse(*args, **kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(torch, "load", refuse)
    assert f"refused to load: not a plain tensor checkpoint ({first});" in _refusal(path)


def test_safetensors_and_json_refusals_say_what_is_missing(tmp_path: pathlib.Path) -> None:

    other = tmp_path / "other.safetensors"
    save_file({"weights": torch.ones(2)}, str(other))
    assert "has no 'thresholds' tensor" in _refusal(other)
    for name, data in (("dict.json", {"other": [0.5]}), ("bools.json", [0.5, True]), ("text.json", "0.5")):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        assert "expected a JSON list of numbers" in _refusal(path)


def test_the_valid_domain_is_exactly_minus_one_to_one_or_inf() -> None:

    ok = validate_thresholds(torch.tensor([-1.0, 1.0, math.inf]), "edges", num_layers=3)
    assert ok.tolist() == [-1.0, 1.0, math.inf]
    assert validate_thresholds(torch.tensor([0.5]), "one layer").tolist() == [0.5]
    for bad in ([-1.0001], [1.0001]):
        with pytest.raises(DymuError, match="outside"):
            validate_thresholds(torch.tensor(bad), "x")
    with pytest.raises(DymuError, match=r"^x: contains no thresholds"):
        validate_thresholds(torch.tensor([]), "x")
    with pytest.raises(DymuError, match=r"^x: thresholds must be a tensor or a list of numbers, got str$"):
        validate_thresholds("0.5", "x")
    with pytest.raises(
        DymuError, match=r"has 2 thresholds but the vision tower has 3 layers; use a file calibrated"
    ):
        validate_thresholds(torch.tensor([0.1, 0.2]), "x", num_layers=3)


def test_our_files_keep_their_metadata(tmp_path: pathlib.Path) -> None:

    path = save_thresholds(tmp_path / "t.safetensors", torch.tensor([0.5, math.inf]), target_tokens=72)
    assert threshold_metadata(path)["target_tokens"] == "72"
