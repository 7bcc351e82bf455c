"""CPU that audit writing costs the node's process per record: the writer thread's handoff to
its child process (now) against appending in the node's process (the thread as it was).
Usage: ``.venv/bin/python benchmarks/audit_handoff.py [--records 100000]``.

"Node CPU" is this process's CPU time, children excluded (``time.process_time``): the core the
event loop needs. The child's CPU is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from postlane.audit.writer import AuditWriter

from postlane.accounting.records import Record
from postlane.audit.sqlite import SQLiteAuditStore


def records(n: int) -> list[Record]:
    t0 = time.time()
    return [Record(type="r" if i % 2 == 0 else "d", time_logged=t0 + i / 1000,
                   time_queued=t0, orig="news@news.example", rcpt=f"reader{i // 2}@example.com",
                   queue_id=f"Q{i // 2:08d}", cls="marketing", vmta_pool="bulk",
                   correlation_id=f"corr-{i // 2}", dsn_diag="smtp;250 2.0.0 ok" if i % 2 else "",
                   dlv_source_ip="127.0.0.16", dlv_destination_ip="127.0.0.1")
            for i in range(n)]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    n = parser.parse_args().records
    batch = records(n)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteAuditStore(Path(tmp) / "in-process.sqlite")
        cpu = time.process_time()
        for i in range(0, n, 100):  # about a 50 ms batch at the bench's rate
            store.append([(r, None) for r in batch[i:i + 100]])
        in_process = (time.process_time() - cpu) / n * 1e6
        store.close()

        writer = AuditWriter(Path(tmp) / "child.sqlite", lambda cls: None)
        writer.start()
        child_before = children_cpu()
        cpu = time.process_time()
        for record in batch:
            writer.add(record)
        assert writer.flush(600) == n
        handoff = (time.process_time() - cpu) / n * 1e6
        writer.close()  # the child is reaped here, so its CPU shows in RUSAGE_CHILDREN
        child = (children_cpu() - child_before) / n * 1e6
    print(f"records: {n}  (pid {os.getpid()})")
    print(f"appending in the node's process:  node CPU {in_process:6.1f} µs/record")
    print(f"handing off to the writer process: node CPU {handoff:6.1f} µs/record,"
          f" writer process {child:6.1f} µs/record")


if __name__ == "__main__":
    main()
