"""The compatibility matrix: cells (envs/cells.toml), the in-cell runner, golden outputs, the report."""
