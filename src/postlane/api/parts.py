"""The parts of a node the API serves, each named: the API never holds the node itself."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..feedback.service import FeedbackService
    from ..monitor.activity import Activity
    from ..monitor.monitor import Monitor
    from ..operations import Operations
    from ..reputation.service import ReputationService
    from ..scheduler.control import QueueSelections
    from ..scheduler.view import QueueView
    from ..spool import Spool


@dataclass(frozen=True, slots=True)
class NodeParts:
    config: Config
    submit: Callable[..., Awaitable[str]]
    """The intake's ``submit`` (injection)."""
    status: Callable[[], dict]
    """The node's status (GET /status, the dashboard)."""
    monitor: Monitor
    operations: Operations
    """The one door for operator actions (it logs and puts them on the record)."""
    activity: Activity
    queue: QueueView
    """The in-memory queue, read-only."""
    control: QueueSelections
    """Selections over the queue for ``postlane queue`` (listing, qshape, deferrals); its
    actions are not in this type: the API acts through ``operations``."""
    spool: Spool
    feedback: FeedbackService
    reputation: ReputationService
    audited: bool
    """Whether the node keeps an audit store (a message's attempts are read from it)."""
