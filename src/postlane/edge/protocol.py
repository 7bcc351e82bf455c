"""aiosmtpd's SMTP protocol without its per-connection introspection.

aiosmtpd builds every connection's command, hook and AUTH tables with ``inspect.getmembers``
and ``dir`` over the protocol and the handler, and ``inspect.signature`` of the EHLO hook: the
same tables for every connection of a listener. With one connection per message (Django's
``send_mail``, a script's ``smtplib.SMTP(...).sendmail``) building the protocol was 15.9 % of
the event loop's samples (py-spy during ``postlane bench --reconnect-every 1``), 2.8 % with
this; the node's CPU per message 0.85× (docs/performance.md). ``QuickSMTP`` runs aiosmtpd's own
``__init__`` once per protocol class and handler, keeps what it set, and gives each later
connection a copy: the per-connection state of ``asyncio.StreamReaderProtocol`` made afresh,
the tables bound to the new protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import SMTP, _AuthMechAttr

__all__ = ["QuickSMTP"]

_TEMPLATES = "_quick_smtp_templates"
"""The handler's attribute holding, per protocol class, the keyword arguments and what aiosmtpd's
``__init__`` set: kept with the handler, it lives as long as its listener."""


def _stream_protocol_keys(loop: asyncio.AbstractEventLoop) -> frozenset[str]:
    """The attributes ``asyncio.StreamReaderProtocol`` sets: made afresh for each connection."""
    probe = asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop),
                                         client_connected_cb=lambda r, w: None, loop=loop)
    keys = frozenset(vars(probe))
    probe._closed.cancel()  # type: ignore[attr-defined]  # nobody awaits the probe's future
    return keys


class QuickSMTP(SMTP):
    """aiosmtpd's ``SMTP``, constructed from a template after the first connection."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        templates = getattr(handler, _TEMPLATES, None)
        cached = templates.get(type(self)) if templates is not None else None
        if cached is None or cached[0] != kwargs:
            super().__init__(handler, **kwargs)
            if templates is None:
                templates = {}
                try:
                    setattr(handler, _TEMPLATES, templates)
                except AttributeError:  # a handler with __slots__: no template
                    return
            fresh = _stream_protocol_keys(self.loop)
            templates[type(self)] = (dict(kwargs),
                                     {k: v for k, v in vars(self).items() if k not in fresh})
            return
        template = cached[1]
        loop = template["loop"]
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        own = self.__dict__
        for key, value in template.items():
            own.setdefault(key, value)
        own["_smtp_methods"] = {name: getattr(self, "smtp_" + name)
                                for name in template["_smtp_methods"]}
        own["_auth_methods"] = {
            name: _AuthMechAttr(getattr(self, attr.method.__name__), True) if attr.is_builtin
            else attr for name, attr in template["_auth_methods"].items()}
        own["_handle_hooks"] = dict(template["_handle_hooks"])
