"""What the tests, the fix checks, the benchmark and the embedded default run on: the tiny
deterministic LLaVA-1.5 in both checkpoint formats (`tiny`), sample images (`sample_images`,
`photos`) and seeded random-weight model builders (`builders`). Nothing is downloaded."""
