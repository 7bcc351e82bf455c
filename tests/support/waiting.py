"""Waiting for a state instead of sleeping for it.

A test that sleeps a fixed time to reach a state is slow when the machine is quiet and flaky when
it is loaded; ``until`` returns as soon as the state holds and fails with what it waited for.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(predicate: Callable[[], T | Awaitable[T]], *, timeout: float = 20.0,
                what: str = "", step: float = 0.01) -> T:
    """Return the first truthy value of ``predicate()`` (sync or async), checked every ``step``
    seconds; AssertionError after ``timeout`` seconds, naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for "
                                 f"{what or getattr(predicate, '__name__', 'a state')}")
        await asyncio.sleep(step)
