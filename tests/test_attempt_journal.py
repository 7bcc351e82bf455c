"""The attempt journal (spool/attempts.py): attempts copied into a shared file mapping come back
from ``latest()``, across windows and rolled files, after a clean close and after a SIGKILL of
the process that wrote them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from postlane.spool.attempts import KEEP, WINDOW, AttemptJournal
from postlane.spool.base import Attempt

INFO = '{"source_ip":"127.0.0.20","mx":"mx.example.com","dest_ip":"127.0.0.5","tls":"TLSv1.3"}'


def attempt(i: int, number: int = 1) -> Attempt:
    return Attempt(f"Q{i:010d}", i % 3, 1_800_000_000.0 + i / 1000, INFO, number)


def files(directory: Path) -> list[Path]:
    return sorted(directory.glob("attempts-*.log"))


def test_attempts_come_back_across_windows_and_rolled_files(tmp_path):
    jnl = AttemptJournal(tmp_path, roll_bytes=2 * WINDOW)
    jnl.open()
    n = 3 * WINDOW // 60  # ~75 bytes a line: more than three windows, so a roll
    # batches of 4 and single attempts, so that lines cross the windows' ends at any point
    batches = [[attempt(j) for j in range(i, min(i + 4, n))] if i % 8 else [attempt(i)]
               for i in range(0, n, 4)]
    for batch in batches:
        jnl.write(batch)
    written = [a for batch in batches for a in batch]
    jnl.close()
    rolled = files(tmp_path)
    assert len(rolled) == 2
    for path in rolled:  # closed cleanly: cut to its lines, no zero tail
        data = path.read_bytes()
        assert data.endswith(b"\n") and b"\0" not in data and len(data) <= 2 * WINDOW
    got = jnl.latest()
    assert len(got) == len(written)
    for a in written:
        assert got[(a.msg_id, a.idx)] == (1, a)


def test_the_latest_attempt_of_a_recipient_wins(tmp_path):
    jnl = AttemptJournal(tmp_path)
    jnl.open()
    jnl.write([attempt(7, 1)])
    jnl.write([attempt(7, 3), attempt(8, 1)])
    jnl.write([attempt(7, 2)])
    jnl.close()
    got = jnl.latest()
    assert got[("Q0000000007", 1)] == (3, attempt(7, 3))
    assert got[("Q0000000008", 2)] == (1, attempt(8, 1))


def test_reading_stops_at_the_zero_tail_and_skips_a_cut_line(tmp_path):
    """What a crash leaves: whole lines, maybe a line cut short, then zeros (and, past them,
    nothing that counts)."""
    whole = b"Q1 0 1 1800000000.000 {}\n"
    cut = b"Q2 0 1 1800000000.001 {\"source_ip\":\"127."
    after = b"\n Q3 0 1 1800000000.002 {}\n"
    (tmp_path / "attempts-0000000000001-1.log").write_bytes(
        whole + cut + b"\0" * 100 + after + b"\0" * 4000)
    got = AttemptJournal(tmp_path).latest()
    assert list(got) == [("Q1", 0)]


def test_files_older_than_keep_go_at_the_next_roll(tmp_path):
    old = tmp_path / "attempts-0000000000001-1.log"
    old.write_bytes(b"Q1 0 1 1800000000.000 {}\n")
    recent = tmp_path / "attempts-0000000000002-1.log"
    recent.write_bytes(b"Q2 0 1 1800000000.000 {}\n")
    then = time.time() - KEEP - 60
    os.utime(old, (then, then))
    jnl = AttemptJournal(tmp_path)
    jnl.open()
    jnl.close()
    assert not old.exists() and recent.exists()
    assert list(jnl.latest()) == [("Q2", 0)]


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from postlane.spool.attempts import AttemptJournal
    from postlane.spool.base import Attempt

    jnl = AttemptJournal(Path(sys.argv[1]))
    jnl.open()
    info = sys.argv[2]
    i = 0
    while True:
        jnl.write([Attempt(f"Q{i:010d}", 0, 1800000000.0 + i / 1000, info, 1)])
        i += 1
        if i % 1000 == 0:
            print(i, flush=True)
""")


def test_attempts_survive_a_sigkill_of_the_writer(tmp_path):
    """A real process copies attempts into the journal nonstop and is killed mid-stream: what
    it told us it wrote is there, and whatever follows is whole attempts in order, never a
    line cut short."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), INFO],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if int(line) >= 3 * WINDOW // 60:  # a few windows written
                break
        told = int(line)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    [path] = files(tmp_path)
    assert path.stat().st_size % WINDOW == 0  # not closed: the allocated zero tail is there
    got = AttemptJournal(tmp_path).latest()
    assert len(got) >= told
    for i in range(len(got)):  # a prefix of what was written, each attempt whole
        assert got[(f"Q{i:010d}", 0)] == (1, Attempt(f"Q{i:010d}", 0, 1_800_000_000.0 + i / 1000,
                                                     INFO, 1))


def test_a_new_journal_after_a_kill_reads_the_old_file_and_starts_its_own(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), INFO],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    jnl = AttemptJournal(tmp_path)
    jnl.open()
    before = len(jnl.latest())
    assert before >= 1000
    jnl.write([attempt(10**9 - 1, 5)])
    got = jnl.latest()
    assert len(got) == before + 1 and got[("Q0999999999", 0)][0] == 5
    jnl.close()
    assert len(files(tmp_path)) == 2


def test_one_write_longer_than_several_windows(tmp_path):
    """A batch whose lines reach over more than one window (allocated at once, copied window
    by window), after a line that leaves the first window nearly full."""
    jnl = AttemptJournal(tmp_path)
    jnl.open()
    assert [p.stat().st_size for p in files(tmp_path)] == [0]  # nothing allocated before use
    first = Attempt("Q0", 0, 1_800_000_000.0, "x" * (WINDOW - 100), 1)
    big = [Attempt(f"Q{i}", 0, 1_800_000_000.0, "y" * 100_000, 1) for i in range(1, 30)]
    jnl.write([first])
    jnl.write(big)
    jnl.write([attempt(99)])
    got = jnl.latest()  # read while still open: the zero tail of the last window
    jnl.close()
    assert [v[1] for v in got.values()] == [first, *big, attempt(99)]
    assert got == jnl.latest()


def test_an_old_file_with_an_unsettled_attempt_is_kept_at_open(tmp_path):
    """A start hours after a crash: the old file goes only once the spool has the outcome of
    every attempt it names (a start killed before writing the "u" must find it again)."""
    old = tmp_path / "attempts-0000000000001-1.log"
    old.write_bytes(b"Q1 0 2 1800000000.000 {}\n")
    then = time.time() - KEEP - 60
    os.utime(old, (then, then))
    seen = []
    jnl = AttemptJournal(tmp_path)
    jnl.open(lambda key, n: seen.append((key, n)) or n > 1)  # the spool counted 1 attempt
    jnl.close()
    assert old.exists() and seen == [(("Q1", 0), 2)]
    jnl.open(lambda key, n: False)  # its "u" recorded: settled
    jnl.close()
    assert not old.exists()
