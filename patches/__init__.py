"""Patch-set data: installed inside the wheel as `dymu.patchdata` (see pyproject.toml)."""
