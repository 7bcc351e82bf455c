"""The MTA-STS cache file is written off the event loop (``MTASTS._persist``: a thread, one
write at a time): policies fetched at the same time all reach the file."""

from __future__ import annotations

import asyncio
import json

from tests.test_outbound_tls import _deliver, first_outcome, world  # noqa: F401  (fixture)


async def test_policies_fetched_together_are_all_in_the_cache_file(world, make_node,  # noqa: F811
                                                                   tmp_path):
    domains = ("sts.test", "both.test", "sts-testing.test")
    for domain in domains:
        world.mx(domain, "good.mx.test")
        world.sts(domain, "enforce", ["*.mx.test"])
    node = await make_node(world.config())
    await asyncio.gather(*(_deliver(node, f"r@{d}", cls="marketing") for d in domains))
    for domain in domains:
        assert (await first_outcome(tmp_path, f"r@{domain}"))["type"] == "d"
    cached = json.loads((tmp_path / "spool" / "mta-sts.json").read_text())
    assert sorted(cached) == sorted(domains)
    assert all(cached[d]["mode"] == "enforce" for d in domains)


async def test_a_cache_file_that_cannot_be_written_holds_no_delivery(world, make_node,  # noqa: F811
                                                                     tmp_path, caplog):
    """The cache file is what a restart starts from; the policy fetched is in memory. A write
    that failed (a full disk; here its temporary file's name is taken by a folder) went up
    through the delivery attempt as an internal error: now it is logged, the delivery goes on
    under the policy, and a later write tries again."""
    world.mx("sts.test", "good.mx.test")
    world.sts("sts.test", "enforce", ["*.mx.test"])
    node = await make_node(world.config())
    blocker = tmp_path / "spool" / "mta-sts.json.tmp"
    blocker.mkdir(parents=True)
    await _deliver(node, "r@sts.test", cls="marketing")
    row = await first_outcome(tmp_path, "r@sts.test")
    assert row["type"] == "d", row
    assert any("MTA-STS cache" in r.getMessage() and "not written" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    blocker.rmdir()
    await node.relay.tls.sts._persist()
    assert "sts.test" in json.loads((tmp_path / "spool" / "mta-sts.json").read_text())
