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
