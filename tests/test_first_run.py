"""What a newcomer sees (issue 13, items 2, 6, 9): calibrate's default target is the one its help
names, an `inf` threshold is explained, doctor's negative controls are worded as a success, and
`dymu bench` with no arguments is a short run on the tiny model."""

from __future__ import annotations

import json
import math

from dymu import cli
from dymu.bench import command as bench_command
from dymu.calibration import default_target_tokens


def test_calibrate_default_target_is_the_one_the_help_names(capsys, tmp_path) -> None:
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["calibrate"].format_help()
    assert "patches / 8" in " ".join(help_text.split()) and "72" in help_text
    assert default_target_tokens(576) == 72 and default_target_tokens(64) == 8
    out = tmp_path / "t.safetensors"
    assert cli.main(["calibrate", "--out", str(out), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["target_tokens"] == default_target_tokens(64)  # the tiny tower has 8 x 8 patches
    assert cli.main(["calibrate", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "target: 8 tokens per image (default: 64 patches / 8" in text
    # the tiny CLIP's last block comes after LLaVA's feature layer (-2): its threshold is inf
    assert "inf = layer never merges" in text and "after --feature-layer" in text


def test_inf_thresholds_are_explained_by_cause() -> None:
    inf = math.inf
    assert cli.explain_inf([0.5, 0.4, 0.3], 3) == []
    past = cli.explain_inf([0.5, 0.4, inf, inf], 2)
    assert len(past) == 1 and "layers 2..3" in past[0] and "never runs them" in past[0]
    idle = cli.explain_inf([0.5, inf, 0.3, inf], 3)
    assert len(idle) == 2 and "layers 1 had no merges" in idle[1] and "layers 3..3" in idle[0]


def test_doctor_negative_says_the_control_reproduced_the_failure(monkeypatch, capsys) -> None:
    rows = [
        {
            "fix": "scatter",
            "needed": "yes",
            "verify": "held",
            "detail": "d",
            "negative": "failed as documented",
        },
        {"fix": "cache-rename", "needed": "yes", "verify": "held", "detail": "d", "negative": "did not fail"},
        {"fix": "tokenizer", "needed": "no", "verify": "held", "detail": "d", "negative": "not run"},
    ]
    monkeypatch.setattr(cli, "check_all", lambda negative: rows)
    assert cli.main(["doctor", "--negative"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")}
    assert lines["scatter"].endswith("| negative control reproduced the documented failure")
    assert "did NOT reproduce the documented failure" in lines["cache-rename"]
    assert lines["tokenizer"].endswith("| negative control: not run")
    assert "failed as documented" not in "".join(lines.values())


def test_bench_defaults_to_a_short_run_on_the_tiny_model() -> None:
    parse = bench_command.parser().parse_args
    assert bench_command.new_tokens(parse([])) == bench_command.TINY_NEW_TOKENS < 64
    assert bench_command.new_tokens(parse(["--model-path", "tiny-legacy"])) == bench_command.TINY_NEW_TOKENS
    assert bench_command.new_tokens(parse(["--model-path", "some/llava"])) == 64  # run_benchmark_dymu.py's
    assert bench_command.new_tokens(parse(["--max-new-tokens", "5"])) == 5
