"""Fast header-block handling for intake.

Hand-written rather than ``email.parser``: intake only needs a few headers (class, correlation
id, Message-ID) and to drop one; BytesHeaderParser costs ~60 µs on a 10 KB message against ~5 µs
here, and intake runs this for every message of a 200,000-message campaign.
"""

from __future__ import annotations

import re

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


def normalize_newlines(data: bytes) -> bytes:
    """Turn every bare LF or CR into CRLF, so that no line ending can be read two ways
    downstream (SMTP smuggling, CVE-2023-51766)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf:
        data = _BARE_LF.sub(b"\r\n", data)
        crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf:
        data = _BARE_CR.sub(b"\r\n", data)
    return data


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """Header block (ending with CRLF) and body; a message without a blank line is all header."""
    head, start = split_head(data)
    return head, data[start:]


def split_head(data: bytes) -> tuple[bytes, int]:
    """``split_message`` giving where the body starts instead of a copy of it (intake takes
    the body as a memoryview: a 25 MB message's body was a second copy of it)."""
    if data.startswith(b"\r\n"):
        return b"", 2
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return (data if data.endswith(b"\r\n") else data + b"\r\n"), len(data)
    return data[: end + 2], end + 4


def header_fields(head: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw field bytes including continuation lines) in order."""
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\r\n" + line)
            continue
        raw_name, sep, _ = line.partition(b":")
        fields.append((raw_name.strip().decode("latin-1").lower() if sep else "", line))
    return fields


def field_value(raw: bytes) -> str:
    """The unfolded value of a raw header field."""
    _, _, value = raw.partition(b":")
    return re.sub(rb"\r\n[ \t]+", b" ", value).strip().decode("utf-8", "replace")


def join_fields(fields: list[tuple[str, bytes]]) -> bytes:
    return b"".join(raw + b"\r\n" for _, raw in fields)
