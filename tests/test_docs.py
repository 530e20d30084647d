"""The repository's own docs (issue 13, item 3): nothing cites documents a clone lacks, every
`docs/...` path cited exists, and docs/compat.md names the fact behind every fix in the patch set."""

from __future__ import annotations

import pathlib
import re

from dymu.compat.registry import fixes

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|DYMU_SPEC|\bCOMPAT\.md|\bDESIGN\.md")


def _sources() -> list[pathlib.Path]:
    globs = ["README.md", "ARCHITECTURE.md", "noxfile.py", "docs/*.md", "dymu/**/*.py", "tests/*.py",
             "envs/*.toml", "patches/*.toml", "scripts/*.py", "compose.yaml", "docker/*", ".ci/run", "ci/*.sh"]  # fmt: skip
    found = {p for g in globs for p in ROOT.glob(g) if p.is_file()}
    return sorted(p for p in found if p != pathlib.Path(__file__).resolve())


def test_no_reference_to_documents_outside_the_repository() -> None:
    files = _sources()
    assert len(files) > 40
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if OUTSIDE.search(line)]  # fmt: skip
    assert not hits, f"cites a document a clone does not have: {hits}"


def test_cited_docs_exist_and_link_to_each_other() -> None:
    cited = set()
    for path in _sources():
        cited |= set(re.findall(r"docs/[a-z_]+\.md", path.read_text(encoding="utf-8", errors="replace")))
    assert {"docs/algorithm.md", "docs/compat.md"} <= cited
    missing = [c for c in cited if not (ROOT / c).is_file()]
    assert not missing, f"cited but not in the repository: {missing}"
    for doc in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#]+\.md)\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / link).resolve().is_file(), f"{doc.name}: broken link {link}"


def test_compat_doc_covers_every_fix() -> None:
    text = (ROOT / "docs" / "compat.md").read_text(encoding="utf-8")
    missing = [name for name in fixes() if f"**{name}**" not in text and f"| {name} |" not in text]
    assert not missing, f"docs/compat.md does not say which version fact these fixes rest on: {missing}"
