"""``make demo``: the case study end to end on this machine.

A node with the four pools of examples/insurance.toml, a loopback sink standing in for the
recipients' providers, a newsletter campaign submitted as fast as the node takes it while policy
notices, claims confirmations and payment receipts trickle in; live progress, then a table per
class against its SLA, the source IPs each class left from, and sample accounting records.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..startup import load_config
from .bench import EXAMPLE, BenchOptions, Progress, run_bench


def _progress_table(p: Progress) -> Table:
    table = Table(title=f"Postlane demo: {p.phase}", expand=False)
    table.add_column("marketing accepted", justify="right")
    table.add_column("transactional submitted", justify="right")
    table.add_column("delivered", justify="right")
    table.add_row(f"{p.marketing_accepted:,} / {p.marketing_total:,}",
                  f"{p.transactional_sent:,}", f"{p.delivered:,}")
    return table


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ips(addresses: list[str]) -> str:
    """127.0.0.16, 127.0.0.17 -> 127.0.0.16-17 (keeps the table narrow)."""
    if not addresses:
        return "-"
    prefix = addresses[0].rpartition(".")[0]
    if all(a.rpartition(".")[0] == prefix for a in addresses) and len(addresses) > 1:
        lasts = sorted(int(a.rpartition(".")[2]) for a in addresses)
        return f"{prefix}.{lasts[0]}-{lasts[-1]}" if lasts[-1] - lasts[0] == len(lasts) - 1 \
            else ", ".join(addresses)
    return ", ".join(addresses)


def run_demo(workdir: Path, marketing: int = 20000, quick: bool = False) -> int:
    """Run the scenario; return 0 when nothing was lost and every SLA held."""
    console = Console() if sys.stdout.isatty() else Console(width=110)  # logs, CI: no wrapping
    config = load_config(EXAMPLE)
    opts = BenchOptions(marketing=200 if quick else marketing, transactional_rate=10.0,
                        config=EXAMPLE, sink_tls="starttls")
    console.print(f"[bold]Postlane demo[/bold]: a {opts.marketing:,}-message newsletter on"
                  " admin-pool while policy notices, claims and receipts arrive at"
                  f" {opts.transactional_rate:.0f}/s on their own pools.")
    with Live(console=console, refresh_per_second=4) as live:
        result = run_bench(opts, lambda p: live.update(_progress_table(p)), workdir=workdir)
        live.update(_progress_table(result["_progress"]))
    console.print()

    ok = result["lost"] == 0
    table = Table(title="Latency per class, submission -> arrival at the provider")
    for col in ("class", "SLA", "sent", "p50", "p95", "p99", "max", "met", "source IPs"):
        table.add_column(col, justify="left" if col in ("class", "source IPs") else "right")
    for name, cls in sorted(config.classes.items(), key=lambda kv: kv[1].priority):
        lat = result["latency_s"].get(name, {})
        met = "-"
        if cls.sla is not None and lat:
            met_ok = lat["max"] <= cls.sla
            ok = ok and met_ok
            met = "[green]yes[/green]" if met_ok else "[red]NO[/red]"
        table.add_row(name, _fmt(cls.sla) if cls.sla else "none",
                      f"{lat.get('n', 0):,}", _fmt(lat.get("p50")), _fmt(lat.get("p95")),
                      _fmt(lat.get("p99")), _fmt(lat.get("max")), met,
                      _ips(result["sources"].get(name, [])))
    console.print(table)
    console.print(f"throughput {result['throughput_msgs_s']:,.0f} msgs/s end to end, intake"
                  f" {result['intake_msgs_s']:,.0f} msgs/s, lost [bold]{result['lost']}[/bold],"
                  f" duplicates {result['duplicates']}, node peak RSS {result['rss_mb_peak']} MB")
    _show_accounting(console, workdir / "accounting")
    console.print(f"Accounting files and spool are in [bold]{workdir}/[/bold].")
    return 0 if ok else 1


def _show_accounting(console: Console, directory: Path) -> None:
    """A few accounting records of one policy notice: the audit trail of its delivery."""
    for path in sorted(directory.glob("*.csv")):
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["class"] == "policy-documents"]
        if not rows:
            continue
        qid = rows[0]["queueId"]
        table = Table(title=f"Accounting records of policy notice {qid} ({path.name})")
        fields = ("type", "timeLogged", "rcpt", "dsnStatus", "dlvSourceIp", "totalSecondsQueued",
                  "header_X-Correlation-ID")
        for f in ("type", "time", "rcpt", "status", "source IP", "queued s", "correlation"):
            table.add_column(f)
        for row in rows:
            if row["queueId"] == qid:
                row["timeLogged"] = row["timeLogged"][11:23]
                table.add_row(*(row[f] for f in fields))
        console.print(table)
        return
