"""h2lib's H2Connection: its open-stream count is jh2's, walked more cheaply."""

from __future__ import annotations

import importlib
from typing import Any

from mcproxy.worker.l7.h2lib import ErrorCodes, H2Configuration, H2Connection

_jh2: Any = importlib.import_module("jh2.connection")  # untyped: no py.typed
REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"a")]


def _client_with_streams() -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    for i in range(12):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, REQUEST, end_stream=i % 3 == 0)  # half-closed (local) or open
        if i % 4 == 1:
            conn.reset_stream(sid, ErrorCodes.CANCEL)  # closed
    return conn


def _states(conn: Any) -> tuple[dict[int, object], dict[int, object]]:
    return (
        {sid: s.state_machine.state for sid, s in conn.streams.items()},
        dict(conn._closed_streams),
    )


def test_open_stream_count_and_forgetting_match_jh2() -> None:
    ours, theirs = _client_with_streams(), _client_with_streams()
    assert _states(ours) == _states(theirs)
    for remainder in (1, 0):
        expected = _jh2.H2Connection._open_streams(theirs, remainder)
        assert ours._open_streams(remainder) == expected
        assert _states(ours) == _states(theirs)
    assert ours.open_outbound_streams == 9 and ours.open_inbound_streams == 0
    assert len(ours.streams) == 9 and len(ours._closed_streams) == 3  # closed ones forgotten
