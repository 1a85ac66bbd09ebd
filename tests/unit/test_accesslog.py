"""The access log's direct write reads exactly like logging's, and yields to any other set-up."""

from __future__ import annotations

import io
import logging
import re
import time

from mcproxy.worker.accesslog import WORKER_FORMAT, AccessLog

LINE = "client=192.0.2.7 listener=127.0.0.1:443 sni=a.test outcome=closed"
TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def isolated_logger(handler: logging.Handler) -> logging.Logger:
    """A logger outside the global tree (no parent), so pytest's handlers stay out of it."""
    logger = logging.Logger("mcproxy.access", logging.INFO)
    logger.addHandler(handler)
    return logger


def test_direct_line_reads_like_logging_and_goes_to_the_handler_stream() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    logger = isolated_logger(handler)
    logger.info(LINE)
    AccessLog(logger).write(LINE)
    by_logging, direct = stream.getvalue().splitlines()
    assert TIMESTAMP.sub("", direct) == TIMESTAMP.sub("", by_logging)
    stamp = TIMESTAMP.match(direct)
    assert stamp is not None
    written = time.mktime(time.strptime(stamp.group(1)[:19], "%Y-%m-%d %H:%M:%S"))
    assert abs(written - time.time()) < 5


def test_a_filter_on_the_handler_still_sees_every_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    seen: list[str] = []

    def remember(record: logging.LogRecord) -> bool:
        seen.append(record.getMessage())
        return True

    handler.addFilter(remember)
    AccessLog(isolated_logger(handler)).write(LINE)
    assert seen == [LINE]
    assert stream.getvalue().endswith(LINE + "\n")


def test_another_format_is_left_to_logging() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s says %(message)s"))
    AccessLog(isolated_logger(handler)).write(LINE)
    assert stream.getvalue() == f"mcproxy.access says {LINE}\n"


def test_a_raised_level_writes_nothing() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    logger = isolated_logger(handler)
    logger.setLevel(logging.WARNING)
    AccessLog(logger).write(LINE)
    assert stream.getvalue() == ""


def test_in_a_loop_the_lines_of_one_turn_go_out_in_one_write() -> None:
    import asyncio

    class Counting(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            Counting.writes += 1
            return super().write(text)

    stream = Counting()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    log = AccessLog(isolated_logger(handler))

    async def turn() -> tuple[str, str]:
        for k in range(3):
            log.write(f"{LINE} n={k}")
        held = stream.getvalue()
        await asyncio.sleep(0)  # the next loop turn
        return held, stream.getvalue()

    held, written = asyncio.run(turn())
    assert held == ""
    assert [line.rsplit(" ", 1)[1] for line in written.splitlines()] == ["n=0", "n=1", "n=2"]
    assert Counting.writes == 1
