"""Where the shared test corpus (``shared/testdata``: real bounces, ARF reports, DMARC reports,
signed mail) lies: beside the repository, or one level further up for a worktree in a folder of
worktrees. A clone without it still passes: the tests that read it skip, saying so."""

from __future__ import annotations

from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]
SHARED = next((p / "shared" for p in (_REPO.parent, _REPO.parent.parent)
               if (p / "shared" / "testdata").is_dir()), _REPO.parent / "shared")
TESTDATA = SHARED / "testdata"


def needs_corpus(path: Path) -> pytest.MarkDecorator:
    """Skip unless ``path`` (a part of the shared corpus) is there."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent: the shared test"
                              " corpus (shared/testdata) is not beside this clone")
