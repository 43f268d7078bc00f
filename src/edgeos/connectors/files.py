"""The files source: an event per new file in a folder, or per row appended to a CSV file.

Every ``interval`` the source looks at each watch (a timer, not a busy loop; polling
rather than inotify works the same on network shares, SD cards and every OS):

- **a folder** (``path`` + ``pattern``, default ``*``): a new regular file whose name
  matches emits ``{"path", "name", "size", "mtime"}``. A file is taken once it has kept
  its size and modification time for one interval, so a file still being copied in is
  not read half-written. Names starting with ``.`` are ignored (temporary files that
  writers rename into place). Only names are remembered: a file removed and created
  again under the same name is new.
- **a CSV file** (``csv: true``): its first line is the header; each complete line
  appended after it emits ``{"path", "line", "row": {column: value}}`` (``line`` counts
  data rows from 1). A last line without its newline is waiting to be finished. A file
  that shrank or was replaced (another inode, as log rotation does) is read from its
  start again.

What was emitted is kept in ``<state_dir>/files-<binding>.json``, written atomically and
synced after every event, so a restart does not emit a file or a row again. The state is
written after ``emit`` returned: a crash between the two emits that one event again
(at least once, never lost). A failing ``emit`` stops that watch until the next look,
which starts again from the last event that was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import fnmatch
import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.connectors.config import FilesSourceConfig, FileWatch
from edgeos.files import write_atomic

if TYPE_CHECKING:
    from edgeos.connectors.events import EventSink

log = logging.getLogger("edgeos.connectors.files")

#: Bytes of a CSV read per look; more is read at the next look, which then comes at once.
MAX_CHUNK = 1 << 20
STATE_VERSION = 1


@dataclass
class _Found:
    """One event to emit, and the watch's state once it has been emitted."""

    data: dict[str, Any]
    state: dict[str, Any]


class FileSource:
    """Watches the folders and CSV files of one ``files`` binding."""

    def __init__(
        self,
        name: str,
        *,
        watch: Mapping[str, FileWatch],
        interval: float,
        state_path: Path,
    ) -> None:
        self.name = name
        self.watch = dict(watch)
        self.interval = interval
        self.state_path = state_path
        self._state: dict[str, dict[str, Any]] = {}
        self._loaded = False
        # Sizes and times of new files seen at the last look: a file is taken when the
        # next look finds them unchanged. Memory only: after a restart, one more look.
        self._settling: dict[str, dict[str, tuple[int, int]]] = {}
        self._problems: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @classmethod
    def from_config(cls, config: FilesSourceConfig, *, state_dir: Path) -> FileSource:
        """The source for a validated binding; its state lives in ``state_dir``."""
        return cls(
            config.name,
            watch=config.watch,
            interval=config.interval,
            state_path=state_dir / f"files-{config.name}.json",
        )

    async def start(self, emit: EventSink) -> None:
        """Look now, then every ``interval`` seconds, in a background task."""
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.get_running_loop().create_task(
                self._run(emit), name=f"edgeos-files-{self.name}"
            )

    async def stop(self) -> None:
        """Stop looking. An emit in progress is cancelled; its event was not recorded,
        so it is emitted again on the next start. Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            self._stopping.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def poll(self, emit: EventSink) -> bool:
        """Look at every watch once and emit what is new; True if a CSV has more to read.

        Used by the background task, and by tests that want one look at a time.
        """
        if not self._loaded:
            self._state = await asyncio.to_thread(self._load)
            self._loaded = True
        more = False
        for event, watch in self.watch.items():
            scan = self._scan_csv if watch.csv else self._scan_folder
            try:
                found, full = await asyncio.to_thread(scan, event, watch)
            except OSError as exc:
                self._problem(event, watch, f"{type(exc).__name__}: {exc.strerror or exc}")
                continue
            self._solved(event, watch)
            more = more or full
            for item in found:
                try:
                    await emit(event, item.data)
                except Exception:
                    log.exception(
                        "files source '%s' watch '%s': emitting failed; trying again at the "
                        "next look", self.name, event,
                    )  # fmt: skip
                    break
                self._state[event] = item.state
                await asyncio.to_thread(self._save)
        return more

    # -- the loop ---------------------------------------------------------------------
    async def _run(self, emit: EventSink) -> None:
        while not self._stopping.is_set():
            try:
                more = await self.poll(emit)
            except Exception:  # a bug or a state file that cannot be written: keep looking
                log.exception("files source '%s': a look failed", self.name)
                more = False
            if not more:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.interval)

    # -- folders ----------------------------------------------------------------------
    def _scan_folder(self, event: str, watch: FileWatch) -> tuple[list[_Found], bool]:
        folder = Path(watch.path)
        pattern = watch.pattern or "*"
        present: dict[str, tuple[int, int]] = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not fnmatch.fnmatchcase(entry.name, pattern):
                    continue
                try:
                    info = entry.stat()
                except FileNotFoundError:  # removed while we looked
                    continue
                if stat.S_ISREG(info.st_mode):
                    present[entry.name] = (info.st_size, info.st_mtime_ns)
        state = self._state.get(event)
        if state is None or state.get("path") != watch.path or state.get("kind") != "folder":
            seen = sorted(present) if watch.skip_existing else []
            state = self._state[event] = {"kind": "folder", "path": watch.path, "seen": seen}
            self._save()
        seen_set = set(state["seen"])
        # Names no longer in the folder are forgotten, so the state stays as small as it.
        kept = sorted(seen_set & set(present))
        if len(kept) != len(seen_set):
            state = self._state[event] = {**state, "seen": kept}
            self._save()
        settling = self._settling.setdefault(event, {})
        ready = []
        for name, mark in present.items():
            if name in seen_set:
                continue
            if settling.get(name) == mark:
                ready.append(name)
            else:
                settling[name] = mark
        for gone in set(settling) - set(present):
            del settling[gone]
        ready.sort(key=lambda n: (present[n][1], n))  # oldest first
        found = []
        seen = list(kept)
        for name in ready:
            settling.pop(name, None)
            size, mtime_ns = present[name]
            seen = sorted([*seen, name])
            data = {"path": str(folder / name), "name": name, "size": size,
                    "mtime": mtime_ns / 1e9}  # fmt: skip
            found.append(_Found(data, {**state, "seen": seen}))
        return found, False

    # -- CSV files --------------------------------------------------------------------
    def _scan_csv(self, event: str, watch: FileWatch) -> tuple[list[_Found], bool]:
        path = Path(watch.path)
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            state = self._state.get(event)
            fresh = state is None or state.get("path") != watch.path or state.get("kind") != "csv"
            if state is None or fresh:
                state = {"kind": "csv", "path": watch.path, "inode": info.st_ino, "offset": 0,
                         "line": 0, "header": None}  # fmt: skip
                if watch.skip_existing:
                    state = _skip_to_end(handle, state)
                self._state[event] = state
                self._save()
            elif state["inode"] != info.st_ino or info.st_size < state["offset"]:
                log.info(
                    "files source '%s' watch '%s': %s was replaced or truncated; reading it "
                    "from the start", self.name, event, path,
                )  # fmt: skip
                state = {**state, "inode": info.st_ino, "offset": 0, "line": 0, "header": None}
                self._state[event] = state
                self._save()
            handle.seek(state["offset"])
            chunk = handle.read(MAX_CHUNK)
        full = len(chunk) == MAX_CHUNK
        end = chunk.rfind(b"\n")
        if end < 0:
            return [], False  # nothing complete yet (or one line longer than a chunk)
        found = []
        offset, line, header = state["offset"], state["line"], state["header"]
        for raw, record in _records(chunk[: end + 1], at_start=offset == 0):
            offset += raw
            if record is None:
                continue  # a blank line
            if header is None:
                header = record
                state = {**state, "offset": offset, "header": header}
                self._state[event] = state  # nothing emitted for the header: record it now
                continue
            line += 1
            row: dict[str, Any] = dict(zip(header, record, strict=False))
            for column in header[len(record) :]:
                row[column] = None
            if len(record) > len(header):
                row["_extra"] = record[len(header) :]
            state = {**state, "offset": offset, "line": line}
            found.append(_Found({"path": str(path), "line": line, "row": row}, state))
        return found, full

    # -- state ------------------------------------------------------------------------
    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = orjson.loads(raw)
            if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} state file")
            watches = data["watches"]
            if not isinstance(watches, dict):
                raise ValueError("'watches' is not a mapping")
        except (ValueError, KeyError) as exc:
            # Starting over emits again what was emitted before: duplicates, not losses.
            aside = self.state_path.with_suffix(f".corrupt-{int(time.time())}")
            self.state_path.replace(aside)
            log.error(
                "files source '%s': state file %s is unreadable (%s); moved to %s and "
                "starting over, which emits existing files and rows again",
                self.name, self.state_path, exc, aside,
            )  # fmt: skip
            return {}
        return watches

    def _save(self) -> None:
        """Write the state atomically and durably: a temporary file, fsync, rename."""
        body = orjson.dumps({"version": STATE_VERSION, "watches": self._state})
        write_atomic(self.state_path, body, 0o644)

    def _problem(self, event: str, watch: FileWatch, problem: str) -> None:
        # Logged once per problem, not at every look: a folder on a volume that is not
        # mounted yet would otherwise fill the log.
        if self._problems.get(event) != problem:
            self._problems[event] = problem
            log.warning(
                "files source '%s' watch '%s': cannot read %s (%s); looking again every %g s",
                self.name, event, watch.path, problem, self.interval,
            )  # fmt: skip

    def _solved(self, event: str, watch: FileWatch) -> None:
        if self._problems.pop(event, None) is not None:
            log.info("files source '%s' watch '%s': %s is readable", self.name, event, watch.path)


def _records(chunk: bytes, *, at_start: bool) -> list[tuple[int, list[str] | None]]:
    """The CSV records of complete lines: (bytes they took, fields or None if blank).

    A quoted field may span lines; the csv reader pulls lines one at a time, so the
    bytes each record took are the lines it pulled.
    """
    lines = chunk.splitlines(keepends=True)
    taken = [0]

    def feed() -> Any:
        for index, raw in enumerate(lines):
            taken[0] += len(raw)
            text = raw.decode("utf-8", errors="replace")
            if index == 0 and at_start:
                text = text.removeprefix("\ufeff")  # a BOM, as spreadsheets write
            yield text

    out: list[tuple[int, list[str] | None]] = []
    reader = csv.reader(feed())
    start = 0
    try:
        for record in reader:
            used, taken[0] = taken[0], 0
            # Quotes come in pairs ("" inside a quoted field is two): an odd count means
            # the reader ran out of lines inside a quoted field that is still being
            # written. It is left for the next look.
            if chunk.count(b'"', start, start + used) % 2:
                break
            start += used
            out.append((used, record or None))
    except csv.Error as exc:  # e.g. a NUL byte: skipping the rest would lose rows
        log.warning("a CSV record cannot be read (%s); it is retried at the next look", exc)
    return out


def _skip_to_end(handle: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The state of a CSV whose existing rows count as seen: header read, offset at the
    last complete line."""
    data = handle.read()
    end = data.rfind(b"\n") + 1
    header = None
    rows = 0
    offset = 0
    for used, record in _records(data[:end], at_start=True):
        offset += used
        if record is None:
            continue
        if header is None:
            header = record
        else:
            rows += 1
    return {**state, "offset": offset, "line": rows, "header": header}
