"""The files source against a real temporary folder and real CSV files, and the files
connector's effect side (one file per effect) against a real folder.

Most source tests take one look at a time with ``FileSource.poll`` (deterministic); one
runs the background timer for real. A "restart" is a new FileSource over the same state
folder, as a node that stopped and started again would build.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from edgeos.connectors import (
    FilesSourceConfig,
    Source,
    build,
    build_all,
    load_connectors,
    parse_connectors,
    start_sources,
    stop_sources,
)
from edgeos.connectors.files import FileSource
from edgeos.errors import ConfigError, ManifestError
from tests.test_connectors import run


class Sink:
    """An event sink that records what was emitted; it can be told to fail at first."""

    def __init__(self, fail: int = 0) -> None:
        self.events: list[tuple[str, Any]] = []
        self.fail = fail
        self.calls = 0

    async def __call__(self, event: str, data: Any) -> list[str]:
        self.calls += 1
        if self.calls <= self.fail:
            raise RuntimeError("the node database is busy")
        self.events.append((event, data))
        return []

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} events expected, got {self.events}")
            await asyncio.sleep(0.01)
        return self.events


def files_source(tmp_path: Path, watch: dict[str, Any], **extra: Any) -> FileSource:
    binding = {"type": "files", "interval": "50ms", "watch": watch, **extra}
    config = parse_connectors({"inbox": binding}, "test", base_dir=tmp_path)["inbox"]
    assert isinstance(config, FilesSourceConfig)
    return FileSource.from_config(config, state_dir=tmp_path / "state")


def looks(source: FileSource, sink: Sink, times: int = 1) -> list[tuple[str, Any]]:
    """Take ``times`` looks; return the events emitted by them."""
    before = len(sink.events)

    async def go() -> None:
        for _ in range(times):
            await source.poll(sink)

    run(go())
    return sink.events[before:]


def rows(events: list[tuple[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(data["line"], data["row"]) for _, data in events]


# -- CSV --------------------------------------------------------------------------------
def test_appended_rows_are_emitted_once_each(tmp_path: Path) -> None:
    sales = tmp_path / "sales.csv"
    sales.write_text("sku,qty\nA-1,3\nB-2,1\n")
    source = files_source(tmp_path, {"sale": {"path": "sales.csv", "csv": True}})
    assert isinstance(source, Source)
    sink = Sink()

    first = looks(source, sink)
    assert first[0] == ("sale", {"path": str(sales), "line": 1, "row": {"sku": "A-1", "qty": "3"}})
    assert rows(first) == [(1, {"sku": "A-1", "qty": "3"}), (2, {"sku": "B-2", "qty": "1"})]
    assert looks(source, sink) == []
    with sales.open("a") as f:
        f.write("C-3,7\nD-4,")  # the last line is still being written
    assert rows(looks(source, sink)) == [(3, {"sku": "C-3", "qty": "7"})]
    with sales.open("a") as f:
        f.write("2\n")
    assert rows(looks(source, sink)) == [(4, {"sku": "D-4", "qty": "2"})]
    assert looks(source, sink, times=3) == []


def test_a_restart_does_not_emit_again(tmp_path: Path) -> None:
    sales = tmp_path / "sales.csv"
    sales.write_text("sku,qty\nA-1,3\n")
    watch = {"sale": {"path": str(sales), "csv": True}}
    sink = Sink()
    assert len(looks(files_source(tmp_path, watch), sink)) == 1
    with sales.open("a") as f:
        f.write("B-2,1\n")
    restarted = files_source(tmp_path, watch)  # the node stopped and started again
    assert rows(looks(restarted, sink)) == [(2, {"sku": "B-2", "qty": "1"})]
    assert looks(files_source(tmp_path, watch), sink) == []
    assert [data["row"]["sku"] for _, data in sink.events] == ["A-1", "B-2"]


def test_a_failing_sink_loses_nothing(tmp_path: Path) -> None:
    (tmp_path / "sales.csv").write_text("sku,qty\nA-1,3\nB-2,1\n")
    source = files_source(tmp_path, {"sale": {"path": "sales.csv", "csv": True}})
    sink = Sink(fail=1)
    assert looks(source, sink) == []  # the first emit failed: the watch waits
    assert [r["sku"] for _, r in rows(looks(source, sink))] == ["A-1", "B-2"]
    # Failing in the middle: the rows after the failure are not skipped.
    with (tmp_path / "sales.csv").open("a") as f:
        f.write("C-3,1\nD-4,1\n")
    sink.fail, sink.calls = 1, 0
    assert looks(source, sink) == []
    assert [r["sku"] for _, r in rows(looks(files_source(tmp_path, source.watch), sink))] == [
        "C-3",
        "D-4",
    ]


def test_a_replaced_or_truncated_file_is_read_from_its_start(tmp_path: Path) -> None:
    sales = tmp_path / "sales.csv"
    sales.write_text("sku,qty\nA-1,3\nB-2,1\n")
    source = files_source(tmp_path, {"sale": {"path": "sales.csv", "csv": True}})
    sink = Sink()
    assert len(looks(source, sink)) == 2
    # Rotation: a new file under the same name (another inode).
    rotated = tmp_path / "sales.csv.new"
    rotated.write_text("sku,qty,note\nC-3,2,x\n")
    os.replace(rotated, sales)
    assert rows(looks(source, sink)) == [(1, {"sku": "C-3", "qty": "2", "note": "x"})]
    # Truncated in place and written again, shorter.
    with sales.open("r+") as f:
        f.truncate(0)
        f.write("sku\nE\n")
    assert rows(looks(source, sink)) == [(1, {"sku": "E"})]


def test_csv_details(tmp_path: Path) -> None:
    """A BOM, quoted fields with commas and line breaks, blank lines, short and long rows."""
    data = tmp_path / "data.csv"
    data.write_bytes(
        b'\xef\xbb\xbfsku,note\nA-1,"low, reorder"\n\nB-2,"two\nlines"\nC-3\nD-4,x,extra\n'
        b'E-5,"still being'
    )
    source = files_source(tmp_path, {"row": {"path": "data.csv", "csv": True}})
    sink = Sink()
    assert rows(looks(source, sink)) == [
        (1, {"sku": "A-1", "note": "low, reorder"}),
        (2, {"sku": "B-2", "note": "two\nlines"}),
        (3, {"sku": "C-3", "note": None}),
        (4, {"sku": "D-4", "note": "x", "_extra": ["extra"]}),
    ]
    with data.open("ab") as f:
        f.write(b'\nwritten"\n')  # a quoted field that spans the two writes
    assert rows(looks(source, sink)) == [(5, {"sku": "E-5", "note": "still being\nwritten"})]


def test_skip_existing_emits_only_what_comes_after_the_first_start(tmp_path: Path) -> None:
    (tmp_path / "sales.csv").write_text("sku,qty\nA-1,3\n")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "old.pdf").write_text("old")
    watch = {
        "sale": {"path": "sales.csv", "csv": True, "skip_existing": True},
        "doc": {"path": "in", "skip_existing": True},
    }
    sink = Sink()
    assert looks(files_source(tmp_path, watch), sink, times=2) == []
    with (tmp_path / "sales.csv").open("a") as f:
        f.write("B-2,1\n")
    (tmp_path / "in" / "new.pdf").write_text("new")
    events = looks(files_source(tmp_path, watch), sink, times=2)
    assert [(e, d.get("line"), d.get("name")) for e, d in events] == [
        ("sale", 2, None),
        ("doc", None, "new.pdf"),
    ]


# -- folders ----------------------------------------------------------------------------
def test_new_files_are_emitted_once_they_stop_changing(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    source = files_source(tmp_path, {"invoice": {"path": "inbox", "pattern": "*.pdf"}})
    sink = Sink()
    assert looks(source, sink) == []
    (inbox / "a.pdf").write_bytes(b"%PDF-1")
    (inbox / "notes.txt").write_text("not a pdf")
    (inbox / ".b.pdf").write_bytes(b"being copied in")  # hidden: a temporary name
    assert looks(source, sink) == []  # seen once: it may still be growing
    (inbox / "a.pdf").write_bytes(b"%PDF-1.7 complete")  # it was
    assert looks(source, sink) == []
    (found,) = looks(source, sink)
    event, data = found
    assert event == "invoice"
    assert data["path"] == str(inbox / "a.pdf")
    assert (data["name"], data["size"]) == ("a.pdf", 17)
    assert abs(data["mtime"] - (inbox / "a.pdf").stat().st_mtime) < 1e-3
    assert looks(source, sink, times=3) == []


def test_folder_state_survives_a_restart_and_forgets_removed_files(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("1.csv", "2.csv"):
        (inbox / name).write_text(name)
    watch = {"drop": {"path": str(inbox)}}
    sink = Sink()
    assert [d["name"] for _, d in looks(files_source(tmp_path, watch), sink, times=2)] == [
        "1.csv",
        "2.csv",
    ]
    (inbox / "3.csv").write_text("3")
    (inbox / "1.csv").unlink()
    restarted = files_source(tmp_path, watch)
    assert [d["name"] for _, d in looks(restarted, sink, times=2)] == ["3.csv"]
    state = (tmp_path / "state" / "files-inbox.json").read_text()
    assert "1.csv" not in state  # forgotten: the state stays as small as the folder
    (inbox / "1.csv").write_text("again")  # so a new file under the old name is new
    assert [d["name"] for _, d in looks(restarted, sink, times=2)] == ["1.csv"]


def test_a_missing_folder_is_waited_for_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = files_source(tmp_path, {"drop": {"path": "later"}})
    sink = Sink()
    with caplog.at_level(logging.WARNING, logger="edgeos.connectors.files"):
        assert looks(source, sink, times=3) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "files source 'inbox' watch 'drop'" in warnings[0]
    assert str(tmp_path / "later") in warnings[0]
    assert "FileNotFoundError" in warnings[0]
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "x.json").write_text("{}")
    assert [d["name"] for _, d in looks(source, sink, times=2)] == ["x.json"]


def test_an_unreadable_state_file_is_moved_aside_and_the_source_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "sales.csv").write_text("sku\nA-1\n")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "files-inbox.json").write_text("{not json")
    source = files_source(tmp_path, {"sale": {"path": "sales.csv", "csv": True}})
    with caplog.at_level(logging.ERROR, logger="edgeos.connectors.files"):
        assert len(looks(source, Sink())) == 1  # duplicates rather than losses
    assert "unreadable" in caplog.text
    assert len(list((tmp_path / "state").glob("files-inbox.corrupt-*"))) == 1


def test_the_background_timer_emits_without_spinning(tmp_path: Path) -> None:
    (tmp_path / "sales.csv").write_text("sku,qty\n")
    source = files_source(tmp_path, {"sale": {"path": "sales.csv", "csv": True}})
    polls = []
    original = source.poll

    async def counted(emit: Any) -> bool:
        polls.append(time.monotonic())
        return await original(emit)

    source.poll = counted  # type: ignore[method-assign]

    async def go() -> list[tuple[str, Any]]:
        sink = Sink()
        await source.start(sink)
        await source.start(sink)  # idempotent
        try:
            await asyncio.sleep(0.12)
            with (tmp_path / "sales.csv").open("a") as f:
                f.write("A-1,3\n")
            events = await sink.wait_for(1)
            await asyncio.sleep(0.3)
            return events
        finally:
            await source.stop()
            await source.stop()

    events = run(go())
    assert rows(events) == [(1, {"sku": "A-1", "qty": "3"})]
    # About 0.5 s at one look per 50 ms: a timer, not a busy loop.
    assert 3 <= len(polls) <= 20, len(polls)


def test_start_sources_from_connectors_yaml(tmp_path: Path) -> None:
    (tmp_path / "drop").mkdir()
    path = tmp_path / "connectors.yaml"
    path.write_text(
        "inbox:\n  type: files\n  interval: 20ms\n"
        "  watch:\n    dropped: {path: drop}\n    sale: {path: sales.csv, csv: true}\n"
    )
    configs = load_connectors(path)
    config = configs["inbox"]
    assert isinstance(config, FilesSourceConfig)
    assert config.interval == 0.02
    # Relative paths are relative to connectors.yaml, not to the working directory.
    assert config.watch["dropped"].path == str(tmp_path / "drop")
    assert build_all(configs) == {}  # a source takes no effects
    with pytest.raises(ConfigError, match="'inbox' \\(files\\) is a source"):
        build(config)

    async def go() -> list[tuple[str, Any]]:
        sink = Sink()
        sources = await start_sources(configs, sink, state_dir=tmp_path / "state")
        try:
            (tmp_path / "drop" / "a.txt").write_text("a")
            (tmp_path / "sales.csv").write_text("sku\nA-1\n")
            return sorted(await sink.wait_for(2))
        finally:
            await stop_sources(sources)

    events = run(go())
    assert [e for e, _ in events] == ["dropped", "sale"]
    assert (tmp_path / "state" / "files-inbox.json").exists()


@pytest.mark.parametrize(
    ("watch", "field", "reason"),
    [
        ("  watch: {}\n", "inbox", "needs watch (to emit events) or operations"),
        ("", "inbox", "needs watch (to emit events) or operations"),
        ("  operations:\n    export: {}\n", "inbox.operations.export.path", "required"),
        ("  operations:\n    ex.port: {path: d}\n", "inbox.operations", "operation name"),
        ("  operations:\n    export: {path: d, mode: 644}\n", "inbox.operations.export.mode",
         "unknown field"),
        ("  watch:\n    x: {path: a.csv, csv: true, pattern: '*.csv'}\n", "inbox.watch.x",
         "not both"),
        ("  watch:\n    x: {path: d, pattern: 'sub/*.csv'}\n", "inbox.watch.x.pattern", "no '/'"),
        ("  watch:\n    x: {pattern: '*'}\n", "inbox.watch.x.path", "required"),
        ("  watch:\n    '9x': {path: d}\n", "inbox.watch", "event name '9x'"),
        ("  interval: 0s\n  watch:\n    x: {path: d}\n", "inbox.interval", "greater than 0"),
        ("  interval: soon\n  watch:\n    x: {path: d}\n", "inbox.interval", "not a duration"),
        ("  watch:\n    x: {path: d, recursive: true}\n", "inbox.watch.x.recursive",
         "unknown field"),
    ],
)  # fmt: skip
def test_each_bad_files_field_is_refused_with_file_and_field(
    tmp_path: Path, watch: str, field: str, reason: str
) -> None:
    path = tmp_path / "connectors.yaml"
    path.write_text("inbox:\n  type: files\n" + watch)
    with pytest.raises(ManifestError) as info:
        load_connectors(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert f"field '{field}'" in message
    assert reason in message


# -- effects: one file per key ---------------------------------------------------------------
def test_effects_become_files_named_by_key_and_a_watching_source_sees_each_once(
    tmp_path: Path,
) -> None:
    (tmp_path / "outbox").mkdir()
    path = tmp_path / "connectors.yaml"
    path.write_text(
        "erp:\n  type: files\n  interval: 20ms\n"
        "  operations:\n    export: {path: outbox}\n"
        "  watch:\n    exported: {path: outbox, pattern: '*.json'}\n"
    )
    configs = load_connectors(path)
    config = configs["erp"]
    assert isinstance(config, FilesSourceConfig)
    assert config.operations["export"].path == str(tmp_path / "outbox")  # relative to the file

    async def go() -> tuple[list[Any], list[tuple[str, Any]]]:
        connectors = build_all(configs)
        sink = Sink()
        sources = await start_sources(configs, sink, state_dir=tmp_path / "state")
        try:
            results = [
                await connectors["erp"].deliver("export", {"sku": "A-1"}, "run/1:0:0"),
                await connectors["erp"].deliver("export", {"sku": "A-1"}, "run/1:0:0"),
                await connectors["erp"].deliver("export", {"sku": "B-2"}, ".run2:0:0"),
            ]
            events = await sink.wait_for(2)
            await asyncio.sleep(0.1)  # a few more looks: nothing else appears
            return results, events
        finally:
            await stop_sources(sources)
            await connectors["erp"].close()

    results, events = run(go())
    assert results == [
        {"file": "run%2F1%3A0%3A0.json", "duplicate": False},
        {"file": "run%2F1%3A0%3A0.json", "duplicate": True},
        {"file": "%2Erun2%3A0%3A0.json", "duplicate": False},
    ]
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == [
        "%2Erun2%3A0%3A0.json",
        "run%2F1%3A0%3A0.json",
    ]  # fmt: skip  (no temporary file left, no file outside the folder)
    written = json.loads((tmp_path / "outbox" / "run%2F1%3A0%3A0.json").read_text())
    assert written == {"idempotency_key": "run/1:0:0", "operation": "export",
                       "payload": {"sku": "A-1"}}  # fmt: skip
    # The watching source sees each file once, complete, and never a temporary one.
    assert sorted(d["name"] for _, d in events) == ["%2Erun2%3A0%3A0.json", "run%2F1%3A0%3A0.json"]


def file_drop(folder: Path) -> Any:
    configs = parse_connectors(
        {"erp": {"type": "files", "operations": {"export": {"path": str(folder)}}}}, "test"
    )
    return build(configs["erp"])


def drop_failure(folder: Path) -> Any:
    from edgeos.connectors import DeliveryError

    async def go() -> DeliveryError:
        with pytest.raises(DeliveryError) as info:
            await file_drop(folder).deliver("export", {"sku": "A"}, "k1")
        return info.value

    return run(go())


def test_a_missing_folder_is_retryable_and_a_file_in_its_place_is_not(tmp_path: Path) -> None:
    missing = drop_failure(tmp_path / "not-mounted")
    assert missing.retryable
    assert not missing.maybe_applied
    assert "ENOENT" in str(missing)
    (tmp_path / "a-file").write_text("not a folder")
    not_folder = drop_failure(tmp_path / "a-file")
    assert not not_folder.retryable
    assert "ENOTDIR" in str(not_folder)


def test_a_folder_the_node_may_not_write_to_is_permanent_and_left_empty(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("the tests run as a user that may write anywhere (root)")
        locked = drop_failure(folder)
    finally:
        folder.chmod(0o700)
    assert not locked.retryable
    assert "EACCES" in str(locked)
    assert list(folder.iterdir()) == []


def test_without_hard_links_the_file_is_renamed_into_place_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def no_links(src: Any, dst: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")  # what FAT answers

    monkeypatch.setattr(os, "link", no_links)
    connector = file_drop(tmp_path)

    async def go() -> list[Any]:
        return [await connector.deliver("export", {"n": i}, "k1") for i in range(2)]

    assert [r["duplicate"] for r in run(go())] == [False, True]
    assert [p.name for p in tmp_path.iterdir()] == ["k1.json"]
    assert json.loads((tmp_path / "k1.json").read_text())["payload"] == {"n": 0}
