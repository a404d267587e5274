"""The private rotated line files (shim.logfile) under the diff log and the capture file:
modes, rotation edge cases, a full queue, a failing disk, a failing renderer, the tick."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from shim.difflog import DiffLog, log_files, read_records
from shim.logfile import LineWriter, PrivateRotatingFileHandler
from tests.reliability.helpers import wait_until


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_files_are_0600_whatever_the_umask_and_an_existing_file_is_narrowed(
        tmp_path: Path) -> None:
    path = tmp_path / "new" / "log.jsonl"
    old = os.umask(0)
    try:
        handler = PrivateRotatingFileHandler(path, max_bytes=100, backups=1)
    finally:
        os.umask(old)
    writer: LineWriter[str] = LineWriter(handler, str, queue_size=10)
    writer.start()
    for i in range(10):
        writer.put(f"line {i} " + "x" * 20)
    assert writer.close()
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert [f.stat().st_mode & 0o777 for f in log_files(path)] == [0o600, 0o600]

    loose = tmp_path / "loose.jsonl"
    loose.write_text("")
    loose.chmod(0o644)
    PrivateRotatingFileHandler(loose, max_bytes=100, backups=1).close()
    assert loose.stat().st_mode & 0o777 == 0o600


def test_a_line_longer_than_max_bytes_goes_into_an_empty_file_without_rotating(
        tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    writer: LineWriter[str] = LineWriter(PrivateRotatingFileHandler(path, 50, 2), str,
                                         queue_size=10)
    writer.start()
    writer.put("y" * 200)
    assert writer.close()
    assert log_files(path) == [path]  # no empty backup pushed the history out
    assert lines(path) == ["y" * 200]


def test_a_full_queue_refuses_and_counts_without_blocking(tmp_path: Path) -> None:
    release = threading.Event()
    rendering = threading.Event()

    def render(item: int) -> str:
        rendering.set()
        release.wait(30)  # the writer is stuck (a slow disk) until the test says so
        return str(item)

    path = tmp_path / "log.txt"
    writer: LineWriter[int] = LineWriter(PrivateRotatingFileHandler(path, 1 << 20, 1),
                                         render, queue_size=2)
    writer.start()
    assert writer.put(0)
    assert rendering.wait(30)  # item 0 is in the writer's hands: the queue is empty
    accepted = [i for i in range(1, 6) if writer.put(i)]
    assert accepted == [1, 2]
    assert writer.dropped == 3
    release.set()
    assert writer.close()
    assert lines(path) == ["0", "1", "2"]
    assert writer.written == 3


def test_a_renderer_that_raises_skips_that_item_and_the_writer_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def render(item: int) -> str:
        if item == 1:
            raise ValueError("cannot render 1")
        return str(item)

    path = tmp_path / "log.txt"
    writer: LineWriter[int] = LineWriter(PrivateRotatingFileHandler(path, 1 << 20, 1),
                                         render, queue_size=10)
    writer.start()
    for i in range(3):
        writer.put(i)
    with caplog.at_level(logging.ERROR, logger="mmshim.logfile"):
        assert writer.close()
    assert lines(path) == ["0", "2"]
    assert "cannot render a line" in caplog.text


def test_a_failing_disk_is_counted_and_logged_once_and_never_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    """/dev/full refuses every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    mode = os.stat("/dev/full").st_mode
    with caplog.at_level(logging.ERROR, logger="mmshim.logfile"):
        log = DiffLog("/dev/full", max_bytes=1000, backups=2, tally_s=60, payloads=True)
        for i in range(5):
            log.write({"kind": "mismatch", "n": i})
        log.count("status", "match")
        log.close()
    assert log.written == 5
    assert log.write_errors >= 6  # five records, the last tally (and the closing flush)
    assert caplog.text.count("cannot write /dev/full") == 1
    assert os.stat("/dev/full").st_mode == mode  # a device is not chmod-ed


def test_a_log_that_cannot_be_opened_raises_oserror(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError):
        DiffLog(blocker / "diffs.jsonl", max_bytes=1000, backups=1)


def test_tallies_are_written_every_tally_s_while_the_log_is_open(tmp_path: Path) -> None:
    path = tmp_path / "diffs.jsonl"
    log = DiffLog(path, max_bytes=1 << 20, backups=1, tally_s=0.05)
    try:
        log.count("status", "match")
        wait_until(lambda: any(r["kind"] == "tally" for r in read_records(path)), 10.0,
                   "the first tally record")
        log.count("status", "mismatch")
        wait_until(lambda: sum(r["kind"] == "tally" for r in read_records(path)) == 2, 10.0,
                   "the second tally record")
    finally:
        log.close()
    tallies = [r["counts"] for r in read_records(path) if r["kind"] == "tally"]
    assert tallies == [{"status": {"match": 1}}, {"status": {"mismatch": 1}}]
