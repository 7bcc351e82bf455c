"""/metrics passes `promtool check metrics` (Debian's prometheus package, which the Makefile
installs), and has queue depth and oldest age per domain with bounded cardinality and deferrals
by reason category (issue 19)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil

import httpx
import pytest

from postlane.policy.intake import RcptIn
from tests.conftest import OPERATOR, config_text, message
from tests.support.waiting import until

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


async def _metrics(node, tmp_path) -> str:
    token = (tmp_path / "api-token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        return (await api.get("/metrics")).text


async def _backlog(tmp_path, sink, make_node, domains: int):
    extra = "".join(f'"d{i}.example" = "127.0.0.1:{sink.port}"\n' for i in range(domains))
    text = config_text(tmp_path, sink.port, extra + '[monitor]\nmetrics_top_domains = 3\n')
    sink.rcpt_replies["late@example.com"] = ["451 4.2.2 mailbox full"]
    sink.rcpt_replies["slow@example.com"] = ["421 4.7.0 try again later"]
    node = await make_node(text.replace('retry = ["1s", "1s", "2s"]', 'retry = ["1h"]'))
    await node.operations.pause("bulk", who=OPERATOR)
    for i in range(domains):  # d0 has 1 queued message, d1 2 ...
        for j in range(i + 1):
            await node.intake.submit("s@insurer.test", [RcptIn(f"r{j}@d{i}.example")],
                                     message("offer", cls="marketing"))
    for rcpt in ("late@example.com", "slow@example.com"):
        await node.intake.submit("s@insurer.test", [RcptIn(rcpt)],
                                 message("policy", cls="policy-documents"))
    await until(lambda: sum(1 for r in node.scheduler.recipients()
                            if r.state.value == "deferred") >= 2,
                what="the two policy notices deferred")
    return node


@pytest.mark.skipif(not os.path.exists(PROMTOOL),
                    reason="needs promtool (Debian package prometheus; make test installs it)")
async def test_promtool_check_metrics_is_clean(tmp_path, sink, make_node):
    node = await _backlog(tmp_path, sink, make_node, 5)
    text = await _metrics(node, tmp_path)
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL, "check", "metrics", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(text.encode())
    assert proc.returncode == 0 and not (out + err).strip(), (out + err).decode()


async def test_domain_depth_is_bounded_and_deferrals_have_categories(tmp_path, sink, make_node):
    node = await _backlog(tmp_path, sink, make_node, 5)
    text = await _metrics(node, tmp_path)
    assert "_created" not in text
    assert "quantile=" not in text, "no quantile label on gauges (it belongs to summaries)"
    depth = dict(re.findall(r'^postlane_domain_queue_depth\{domain="([^"]+)"\} (\S+)$', text,
                            re.M))
    # the 3 deepest domains by name (d4: 5, d3: 4, d2: 3), the rest (d1, d0, example.com) summed
    assert depth == {"d4.example": "5.0", "d3.example": "4.0", "d2.example": "3.0",
                     "other": "5.0"}
    oldest = dict(re.findall(r'^postlane_domain_oldest_age_seconds\{domain="([^"]+)"\} (\S+)$',
                             text, re.M))
    assert set(oldest) == set(depth) and all(float(v) > 0 for v in oldest.values())
    deferrals = dict(re.findall(
        r'^postlane_deferrals_total\{category="([^"]+)",pool="critical"\} (\S+)$', text, re.M))
    assert deferrals == {"quota-issues": "1.0", "policy-related": "1.0"}, deferrals
