"""The README's tour, extracted and run exactly as written (bash, in a fresh folder, with this
venv's ``postlane`` first on the PATH), and the docs free of references outside the repository.
The tour uses fixed loopback ports (2600, 2587, 2526, 8026), as a reader's shell would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "`tests/test_readme.py` runs this block"


def tour() -> str:
    text = (REPO / "README.md").read_text()
    after = text[text.index(MARKER):]
    return re.search(r"```sh\n(.*?)```", after, re.S).group(1)


@pytest.mark.timeout(330)  # ~20 commands, each a Python start: 23 s quiet, minutes when loaded
def test_the_readme_tour_runs_as_written(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", "-e", "-c", tour()], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # show where it stood, not only that it took too long
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the tour did not finish in 300 s; its output so far:\n{out}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    # the sink printed the message, the trail says delivered, the pause of the regulated pool
    # was refused, the backup and the checklist were written
    assert re.search(r"from 127\.0\.0\.10 \(tx1\.insurer\.example\) <[^>]*@bounces\.insurer"
                     r"\.example> to anna@example\.com: Your renewal", out), out
    assert "delivered" in out and "refused: pausable = false" in out
    assert "records verified" in out or "ok" in out
    assert (tmp_path / "tour-backup" / "manifest.json").is_file()
    assert "; DNS records for the Postlane node mta.example" in out


def test_docs_and_help_send_nobody_outside_the_repository():
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for path in texts:
        text = path.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, path
    helps = subprocess.run([Path(sys.executable).parent / "postlane", "bench", "--help"],
                           capture_output=True, text=True, timeout=60).stdout
    assert "DESIGN" not in helps
    for path in (REPO / "src").rglob("*.py"):
        assert "DESIGN.md" not in path.read_text() and "../shared" not in path.read_text(), path


def test_the_tour_can_be_run_again_from_the_clone():
    """The tour runs from the clone (``make .venv/.installed``, then the block): it left
    ``tour/`` and ``tour-backup/`` as untracked files in the operator's checkout, and a second
    run stopped at ``init`` ("tour exists and is not empty") with nothing in the README to say
    why or what to do. Git ignores both now and the README says how to run the tour again."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("tour/postlane.toml", "tour/var/spool/spool.sqlite", "tour-backup/manifest.json"):
        check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path], timeout=30)
        assert check.returncode == 0, f"{path} is not ignored"
    text = (REPO / "README.md").read_text()
    assert "rm -rf tour tour-backup" in text
