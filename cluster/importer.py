"""``tally import FILE``: JSON lines or CSV of events or increments, exactly once, resumable.

The file is streamed through the client library (``tally.client``) with durable
acks, like any producer. What this module adds is what makes an import safe to
interrupt and run again:

**Resume is (producer, seq) dedup, not bookkeeping.** The file is cut into
chunks deterministically, from its bytes only (increments: at the first line
end after ``chunk_rows`` lines or once a bound on the frame reaches
``chunk_bytes``, see ``import_read``; events: after ``chunk_rows`` records or
a bound on their frame), and each chunk is sent as exactly one batch whose
seq is *the byte offset where the chunk ends*. The producer name is derived
from the file (absolute path, size, mtime, format, kind, the scheme and the
chunking), so a given (producer, seq) always carries the same increments. An
increments file half-imported by a tally from before the columnar reader
(scheme ``import-v1``) is therefore a new producer to this one: run it to
the end with the tally that began it, or it counts that half twice.
On start the server's ``welcome.durable_seq`` for that producer is
therefore the offset up to which the file is durable: the import seeks there
and sends the rest. Batches after it that a killed run had sent are sent again
with the same seqs; the server applies each (producer, seq) once, so those
that were applied (but not yet durable) are only acknowledged, and those that
were lost are applied. No side file is needed, and none could be trusted more
than the server's own mark.

The client normally numbers batches from the wall clock and seals them on a
timer; neither is deterministic, so ``FileClient`` (a ``TallyClient``) is
given the first seq (``first_seq``), never lingers (``linger=None``), and the
importer seals each chunk itself with the chunk's seq (``seal(seq)``), all
public options and hooks of the client. Everything else -- pipelining,
reconnects, resends, backpressure, the durable flush -- is the client library's.

**Bad rows are reported, never fatal, never silent.** A line that is not JSON,
lacks a field, names an invalid series, carries a timestamp an hour ahead, or
(for events) that the fan-out rules would refuse is reported with its line
number and skipped; the rest of its chunk goes on. Events are checked against
the same rules the server applies (the built-in ones unless ``--rules``), so a
bad event cannot take its whole batch down with it (the server refuses a batch
all or nothing). If the server still refuses a batch, the summary names the
line the server named, the chunk's lines and how many rows were not applied.

Increments are read columnar (``import_read``: pyarrow's readers over each
chunk's bytes; ``import_batch``: vectorised checks and packing, the per-line
path for any row they cannot vouch for) and sent with
``TallyClient.send_columnar``; events go line by line through ``send``.

File formats (see README, "tally import"):

- JSON lines: one object per line. Increments ``{"tenant", "metric", "ts",
  "value"?, "tags"?}`` (value defaults to 1; tags an object or null); events
  ``{"type", "tenant", "ts", ...fields}``.
- CSV with a header row. Increments: columns ``tenant, metric, ts`` and
  optionally ``value``, ``tags`` (a JSON object) and ``tag.KEY`` columns (one
  per tag key; an empty cell means the series has no such tag). Events:
  ``type, tenant, ts`` and one column per field; an empty cell is an absent
  field, a cell that reads as a number is a number unless the rules use that
  field as a tag.
- ``ts``: integer Unix seconds, or an ISO 8601 datetime (UTC when it has no
  offset).

A file must not change between an interrupted run and its resume (a changed
size or mtime is a new producer, i.e. a new import). Two imports of the same
file at once are wasteful but still exact: both send the same seqs.
"""

from __future__ import annotations

import hashlib
import os
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tally.api.rules import BUILTIN, BadEvent, Rules, RulesError, load_rules
from tally.client import (
    BatchRejected,
    ClientFailed,
    Connection,
    ProducerConflict,
    TallyClient,
    TallyError,
    TallyTimeout,
)
from tally.cluster.import_batch import ChunkBatch, build_batch
from tally.cluster.import_formats import (  # re-exported: the importer's public names
    GROWTH,
    CsvFile,
    Event,
    ImportFailed,
    Increment,
    JsonLines,
    RowError,
    Source,
    detect_format,
    open_source,
    parse_ts,
)
from tally.cluster.import_read import CHUNK_BYTES, CHUNK_ROWS, LINE_OVERHEAD, Chunk, chunks
from tally.cluster.import_series import SeriesTable
from tally.wire.frames import DEFAULT_MAX_FRAME, MAX_PRODUCER
from tally.wire.series import InvalidSeries, series_key
from tally.wire.vocabulary import INT64_MAX, INT64_MIN

__all__ = [
    "CsvFile",
    "Event",
    "FileClient",
    "ImportFailed",
    "Increment",
    "JsonLines",
    "RowError",
    "Source",
    "parse_ts",
    "ImportOptions",
    "ImportResult",
    "Rejection",
    "run_import",
]

# Events keep the per-record path and its chunking: a chunk ends after EVENT_CHUNK_ROWS
# records, or once a bound on its frame (GROWTH bytes per byte of text, plus overheads,
# see import_formats) reaches EVENT_CHUNK_BYTES; it may overshoot by one record (refused
# above this size too), so a chunk stays within 2 x 3 MiB, under the client's 8 MiB cap.
EVENT_CHUNK_ROWS = 20_000
EVENT_CHUNK_BYTES = 3 << 20
# Part of the producer name: bump it whenever parsing or chunking changes what a seq
# carries, so an import resumed by a newer tally never mixes the two. v2: increments are
# chunked by lines and bytes (import_read); events still chunk as in v1, so their names
# are unchanged.
SCHEME = {"increments": "import-v2", "events": "import-v1"}


@dataclass
class ImportOptions:
    """What ``tally import`` was asked; the defaults are the command line's."""

    path: str
    format: str | None = None  # "jsonl" | "csv"; None: by the file's extension
    kind: str = "auto"  # "auto" | "events" | "increments"
    producer: str | None = None  # None: derived from the file (stable across runs)
    host: str = "127.0.0.1"
    tcp_port: int = 8781
    token: str | None = None
    rules: Rules | None = BUILTIN  # None: events are judged by the server only
    timeout: float = 60.0  # for connecting, backpressure and the final durable flush
    # None: by kind (increments: import_read's CHUNK_*; events: EVENT_CHUNK_*)
    chunk_rows: int | None = None
    chunk_bytes: int | None = None
    threads: bool = True  # let pyarrow parse a chunk on every core
    progress: bool = True
    # Tests only: once this many batches are applied, drop the client as a crash would
    # (whatever is not durable yet is left to the next run), which must resume exactly.
    stop_after_batches: int | None = None


@dataclass(frozen=True)
class Rejection:
    """A record that was not imported: refused here (one row) or by the server (a batch)."""

    line: int
    reason: str
    rows: int = 1  # rows not applied because of it (a server refusal takes its batch)
    by_server: bool = False


@dataclass
class ImportResult:
    """What one run did; ``complete`` means every row of the file is durable or reported."""

    path: str
    format: str
    kind: str
    producer: str
    size: int
    start_offset: int = 0  # the file was durable up to here when this run started
    resumed: bool = False  # an earlier run had made part of the file durable
    start_line: int = 1
    rows: int = 0  # records read by this run
    sent: int = 0  # rows handed to the client (increments, or events)
    increments: int | None = 0  # increments those rows make (None: events not checked here)
    rejected: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False
    interrupted: bool = False
    problem: str | None = None  # why the run is not complete

    @property
    def rejected_rows(self) -> int:
        return sum(r.rows for r in self.rejected)

    @property
    def server_rejected_rows(self) -> int:
        return sum(r.rows for r in self.rejected if r.by_server)

    @property
    def already_done(self) -> bool:
        return self.start_offset >= self.size


# --------------------------------------------------------------------- the client


class FileClient(TallyClient):
    """A ``TallyClient`` whose batches are the importer's chunks, each with a chosen seq.

    ``TallyClient`` seals batches by size, bytes and a linger timer and numbers
    them from the wall clock, which is right for live producers and wrong for a
    resumable import, where a seq must name the same rows in every run. Here
    size and linger never trigger (the importer's chunks are far below the byte
    cap, and ``seal_as`` checks that no batch was sealed behind its back) and
    ``seal_as(seq)`` closes the open batch with the seq the importer gives it.
    Only the client's public API is used.
    """

    def __init__(
        self, host: str, port: int, *, producer: str, token: str | None, first_seq: int,
        timeout: float, max_batch_bytes: int = DEFAULT_MAX_FRAME,
    ) -> None:
        super().__init__(
            host, port, producer=producer, token=token, batch_size=2**31, linger=None,
            timeout=timeout, first_seq=first_seq, max_batch_bytes=max_batch_bytes,
        )
        self._batches_seen = 0

    def seal_as(self, seq: int) -> None:
        """Seal the open batch (if any) as ``seq``; seqs must increase."""
        if self.stats["batches"] != self._batches_seen:
            raise ClientFailed(
                "the client sealed a batch on its own (a chunk outgrew its byte cap): "
                "the seqs would no longer match the file; lower the chunk size"
            )
        self.seal(seq)
        self._batches_seen = self.stats["batches"]

    def abandon(self) -> None:
        """Stop at once, as a crash would, without sealing or sending the open batch.

        ``close`` would flush, and flushing seals the half-read chunk under the
        next seq: rows sent under a seq that is not their chunk's, which a later
        run could not recognise. ``abort`` stops without sealing; what is not
        durable is left to the next run, which resends it under the right seqs.
        """
        self.abort()

    def durable_and_rejections(self) -> tuple[int, list[BatchRejected]]:
        """The server's durable seq and every refusal queued so far.

        In this order: a refusal of seq s is queued before the durable seq can
        move past s, so once both are read, no refusal at or below the returned
        seq can still arrive and what the importer keeps for those seqs can go.
        """
        durable = self.durable_seq
        return durable, self.take_rejections()



def chunking(kind: str, chunk_rows: int | None, chunk_bytes: int | None) -> tuple[int, int]:
    """The chunk bounds a kind uses, the given ones first."""
    rows, size = (CHUNK_ROWS, CHUNK_BYTES) if kind == "increments" else (EVENT_CHUNK_ROWS,
                                                                         EVENT_CHUNK_BYTES)
    return chunk_rows or rows, chunk_bytes or size


def producer_for(path: str, fmt: str, kind: str, chunk_rows: int | None = None,
                 chunk_bytes: int | None = None) -> str:
    """A name that is the same in every run over the same, unchanged file.

    Size and mtime are in it so that an edited or regrown file is a new import
    rather than a resume into rows that moved; the format, kind and chunking
    are in it because they decide what each seq carries.
    """
    chunk_rows, chunk_bytes = chunking(kind, chunk_rows, chunk_bytes)
    p = Path(path).resolve()
    st = p.stat()
    ident = (f"{SCHEME[kind]}|{p}|{st.st_size}|{st.st_mtime_ns}|{fmt}|{kind}|{chunk_rows}|"
             f"{chunk_bytes}")
    digest = hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return f"import:{p.name[:100]}:{digest}"


def lines_before(f: BinaryIO, offset: int) -> int:
    """How many lines end before ``offset`` (a fast scan; resuming needs the line numbers)."""
    f.seek(0)
    count = 0
    left = offset
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        count += block.count(b"\n")
        left -= len(block)
    return count


def durable_offset(opts: ImportOptions, producer: str) -> int:
    """The server's durable seq for the producer: the byte offset the file is durable up to."""
    try:
        with Connection(opts.host, opts.tcp_port, producer=producer, token=opts.token,
                        timeout=opts.timeout) as conn:
            return int(conn.welcome["durable_seq"])
    except TallyError as e:
        raise ImportFailed(f"{opts.host}:{opts.tcp_port} refused the import: {e}") from None
    except OSError as e:
        raise ImportFailed(f"cannot reach {opts.host}:{opts.tcp_port}: {e}") from None


# ----------------------------------------------------------------------- the import


class _Run:
    """One pass over the file, from the server's durable offset to the end."""

    def __init__(self, opts: ImportOptions, src: Source, fmt: str, producer: str,
                 size: int, progress: Progress | None) -> None:
        self.opts = opts
        self.src = src
        self.producer = producer
        self.result = ImportResult(opts.path, fmt, src.kind, producer, size)
        if src.kind == "events" and src.rules is None:
            self.result.increments = None
        self.progress = progress
        self.chunk_rows, self.chunk_bytes = chunking(src.kind, opts.chunk_rows, opts.chunk_bytes)
        # seq -> line of each row, until durable
        self.batch_lines: dict[int, array | np.ndarray] = {}
        self.valid_series: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()

    # -- rows ---------------------------------------------------------------------------

    def reject(self, line: int, reason: str) -> None:
        self.result.rejected.append(Rejection(line, reason))

    def server_rejected(self, e: BatchRejected) -> None:
        lines = self.batch_lines.pop(e.seq, None)
        code = e.frame.get("code")
        message = e.frame.get("message")
        if lines is None or not len(lines):
            self.result.rejected.append(Rejection(
                0, f"the server refused batch seq {e.seq} ({e.increments} rows, none applied): "
                   f"{code}: {message}", e.increments, True))
            return
        line = lines[e.row] if e.row is not None and 0 <= e.row < len(lines) else lines[0]
        self.result.rejected.append(Rejection(
            line, f"the server refused the batch of lines {lines[0]}-{lines[-1]} ({len(lines)} "
                  f"rows, none applied), naming line {line}: {code}: {message}",
            len(lines), True))

    def check_event(self, tenant: str, etype: str, ts: int, fields: dict[str, Any]) -> int:
        """The increments the rules make of this event; ``RowError`` if they would refuse it.

        One refused event makes the server refuse its whole batch, so whatever
        the rules would refuse is caught here, row by row.
        """
        rules = self.src.rules
        if rules is None:
            return 0
        event = {"type": etype, "tenant": tenant, "ts": ts, **fields}
        try:
            made = rules.event_rows(0, event)
        except BadEvent as e:
            raise RowError(e.message.replace("event 0", "event", 1)) from None
        for rule, (t, metric, tags, _, value) in made:
            key = (t, metric, tuple(sorted(tags.items())) if tags else ())
            if key not in self.valid_series:
                try:
                    series_key(t, metric, tags)
                except InvalidSeries as e:
                    raise RowError(f"rule {rule.name!r} makes an invalid series: {e}") from None
                self.valid_series.add(key)
            if not INT64_MIN <= value <= INT64_MAX:
                raise RowError(f"rule {rule.name!r} makes value {value}, outside int64")
        return len(made)

    def send(self, client: FileClient, item: Increment | Event) -> int:
        """Hand one row to the client; the increments it makes (events: per the rules)."""
        increments = self.src.kind == "increments"
        made = 1 if increments else self.check_event(*item)  # type: ignore[arg-type]
        while True:
            try:
                if increments:
                    client.inc(*item)  # type: ignore[arg-type]
                else:
                    tenant, etype, ts, fields = item  # type: ignore[misc]
                    client.event(tenant, etype, ts, **fields)
                return made
            except BatchRejected as e:  # an earlier batch's refusal; this row was not buffered
                self.server_rejected(e)

    # -- the pass -----------------------------------------------------------------------

    def run(self) -> ImportResult:
        opts, res = self.opts, self.result
        start = max(durable_offset(opts, self.producer), self.src.data_start())
        with open(opts.path, "rb") as f:
            if start > res.size or (start < res.size and start > 0
                                    and _byte_at(f, start - 1) != b"\n"):
                raise ImportFailed(
                    f"producer {self.producer!r} is durable up to byte {start}, which is not "
                    f"a line boundary of {opts.path} ({res.size} bytes): is that producer "
                    "name used for another file?"
                )
            res.start_offset = start
            res.resumed = start > self.src.data_start()
            res.start_line = lines_before(f, start) + 1
            if res.already_done:
                res.complete = True
                return res
            client = FileClient(opts.host, opts.tcp_port, producer=self.producer,
                                token=opts.token, first_seq=start + 1, timeout=opts.timeout)
            began = time.monotonic()
            try:
                if self.src.kind == "increments":
                    self._stream_columnar(f, client, start, res.start_line)
                else:
                    self._stream(f, client, start, res.start_line)
                if not res.interrupted:
                    self._finish(client)
            except KeyboardInterrupt:
                res.interrupted = True
                res.problem = "interrupted"
            except TallyTimeout as e:
                res.problem = f"not everything is durable yet: {e}"
            finally:
                res.seconds = time.monotonic() - began
                if res.complete:
                    client.close()  # everything is durable: nothing is left to flush
                else:
                    client.abandon()
        return res

    def _stream(self, f: BinaryIO, client: FileClient, start: int, line: int) -> None:
        opts, res, src = self.opts, self.result, self.src
        prev = start  # where the previous record ended
        in_chunk = 0
        lines = array("I")
        batches = 0
        progress = self.progress
        task = None
        if progress is not None:
            task = progress.add_task("rows 0", total=res.size, completed=start)
        end = start
        bound = 0  # an upper bound on the open chunk's frame bytes
        overhead = src.overhead()
        for line_no, end, payload in src.records(f, start, line):
            res.rows += 1
            in_chunk += 1
            size = GROWTH * (end - prev) + overhead  # (blank lines before it included)
            prev = end
            try:
                if size > self.chunk_bytes:
                    raise RowError(f"a record of {(size - overhead) // GROWTH:,} bytes is too "
                                   "large for one batch (at most about "
                                   f"{(self.chunk_bytes - overhead) // GROWTH:,})")
                bound += size
                made = self.send(client, src.parse(payload))
            except (RowError, ValueError, TypeError) as e:  # the client checks series, ranges
                self.reject(line_no, str(e))
            else:
                lines.append(line_no)
                res.sent += 1
                if res.increments is not None:
                    res.increments += made
            if in_chunk >= self.chunk_rows or bound >= self.chunk_bytes:
                batches += self._seal(client, end, lines)
                in_chunk, bound, lines = 0, 0, array("I")
                if progress is not None and task is not None:
                    progress.update(task, completed=end, description=f"rows {res.rows:,}")
                if opts.stop_after_batches is not None and batches >= opts.stop_after_batches:
                    # A crash once the batches are applied, durable or not: the case where
                    # a resend must be recognised rather than applied again.
                    client.flush(durable=False, timeout=opts.timeout)
                    res.interrupted = True
                    res.problem = f"stopped after {batches} batches (test hook)"
                    return
        # The last chunk ends where reading did (trailing blank lines included), so a
        # finished import is durable up to the file's size.
        batches += self._seal(client, max(end, f.tell()), lines)
        if progress is not None and task is not None:
            progress.update(task, completed=res.size, description=f"rows {res.rows:,}")

    def _stream_columnar(self, f: BinaryIO, client: FileClient, start: int, line: int) -> None:
        """Increments: each chunk read columnar (``import_read``, ``import_batch``), one
        columnar batch per chunk, seq = the offset where the chunk ends."""
        opts, res, src = self.opts, self.result, self.src
        table = SeriesTable()
        progress, task = self.progress, None
        if progress is not None:
            task = progress.add_task("rows 0", total=res.size, completed=start)
        is_csv = isinstance(src, CsvFile)
        header_keys = sum(len(c.encode()) + 3 for c in src.header) if is_csv else 0
        batches = 0
        for chunk in chunks(f, start, line, chunk_bytes=self.chunk_bytes,
                            chunk_rows=self.chunk_rows, overhead=LINE_OVERHEAD + header_keys,
                            csv=is_csv):
            batch = self.batch(chunk, table)
            res.rows += batch.rows
            for line_no, reason in batch.rejected:
                self.reject(line_no, reason)
            n = len(batch.ts)
            res.sent += n
            if res.increments is not None:
                res.increments += n
            self._drain(client)
            if n:
                series, index = table.encode(batch.entries)
                table.trim()
                self.batch_lines[chunk.end] = batch.lines
                while True:
                    try:
                        client.send_columnar(chunk.end, series, index, batch.ts, batch.values)
                        break
                    except BatchRejected as e:  # an earlier batch's; this one is not kept
                        self.server_rejected(e)
                batches += 1
            if progress is not None and task is not None:
                progress.update(task, completed=chunk.end, description=f"rows {res.rows:,}")
            if opts.stop_after_batches is not None and batches >= opts.stop_after_batches:
                client.flush(durable=False, timeout=opts.timeout)
                res.interrupted = True
                res.problem = f"stopped after {batches} batches (test hook)"
                return

    def batch(self, chunk: Chunk, table: SeriesTable) -> ChunkBatch:
        """One chunk's columnar batch and refused lines (a method: tests interrupt it)."""
        return build_batch(chunk, self.src, table, chunk_bytes=self.chunk_bytes,
                           overhead=self.src.overhead(), threads=self.opts.threads)

    def _seal(self, client: FileClient, end: int, lines: array) -> int:
        """Close the chunk ending at ``end`` as batch seq ``end``; 1 if it held rows."""
        self._drain(client)
        if not len(lines):
            return 0
        self.batch_lines[end] = lines
        client.seal_as(end)
        return 1

    def _drain(self, client: FileClient) -> None:
        durable, rejections = client.durable_and_rejections()
        for e in rejections:
            self.server_rejected(e)
        for seq in [s for s in self.batch_lines if s <= durable]:
            del self.batch_lines[seq]

    def _finish(self, client: FileClient) -> None:
        while True:
            try:
                client.flush(durable=True, timeout=self.opts.timeout)
                break
            except BatchRejected as e:
                self.server_rejected(e)
        self._drain(client)
        self.result.complete = True


def _byte_at(f: BinaryIO, offset: int) -> bytes:
    f.seek(offset)
    return f.read(1)


def run_import(opts: ImportOptions, console: Console | None = None) -> ImportResult:
    """Import ``opts.path``, resuming where the server says it is durable; the summary.

    Raises ``ImportFailed`` when the import cannot start (no such file, format
    or kind unknown, server unreachable, refused token) or the client fails for
    good; rows that cannot be imported are in the result, never raised.
    """
    path = opts.path
    if not os.path.isfile(path):
        raise ImportFailed(f"{path}: no such file")
    fmt = detect_format(path, opts.format)
    src = open_source(path, fmt, opts.kind, opts.rules)
    producer = opts.producer or producer_for(path, fmt, src.kind, opts.chunk_rows,
                                             opts.chunk_bytes)
    if not 1 <= len(producer) <= MAX_PRODUCER:
        raise ImportFailed(f"--producer must be 1 to {MAX_PRODUCER} characters")
    size = os.path.getsize(path)
    console = console or Console(stderr=True)
    for attempt in range(3):
        progress = _progress(console) if opts.progress else None
        try:
            if progress is not None:
                progress.start()
            return _Run(opts, src, fmt, producer, size, progress).run()
        except ProducerConflict as e:
            # The durable seq moved between our look and our hello (a killed run's last
            # checkpoint landing): look again. Twice more means another live client.
            if attempt == 2:
                raise ImportFailed(f"producer {producer!r}: {e}") from None
        except TallyError as e:  # a refused token, a client that failed for good
            raise ImportFailed(str(e)) from None
        finally:
            if progress is not None:
                progress.stop()
    raise ImportFailed(f"producer {producer!r}: could not start")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]import[/] {task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(), console=console, transient=False,
    )


def load_rules_option(value: str | None) -> Rules | None:
    """``--rules``: a file, ``none`` (no local check of events), or the built-ins."""
    if value is None or value == "builtin":
        return BUILTIN
    if value == "none":
        return None
    try:
        return load_rules(value)
    except RulesError as e:
        raise ImportFailed(str(e)) from None


MAX_SHOWN = 20


def summary(res: ImportResult) -> Table:
    """The summary table printed after an import."""
    table = Table(title=escape(f"tally import {res.path}"), show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("file", f"{res.format}, {res.kind}, {res.size:,} bytes")
    table.add_row("producer", escape(res.producer))
    if res.resumed:
        table.add_row("resumed", f"durable up to byte {res.start_offset:,}; from line "
                      f"{res.start_line:,}")
    if res.already_done:
        table.add_row("status", "already imported: every line is durable, nothing sent")
        return table
    table.add_row("rows read", f"{res.rows:,}")
    applied = res.sent - res.server_rejected_rows
    if res.kind == "events":
        made = "" if res.increments is None else f" ({res.increments:,} increments by the rules)"
        table.add_row("events sent", f"{applied:,}{made}")
    else:
        table.add_row("increments sent", f"{applied:,}")
    table.add_row("rejected", f"{len(res.rejected):,} ({res.rejected_rows:,} rows not imported)")
    for r in res.rejected[:MAX_SHOWN]:
        where = f"line {r.line}" if r.line else "batch"
        table.add_row("", escape(f"{where}: {r.reason}"))
    if len(res.rejected) > MAX_SHOWN:
        table.add_row("", f"... and {len(res.rejected) - MAX_SHOWN:,} more")
    rate = res.rows / res.seconds if res.seconds > 0 else 0.0
    table.add_row("time", f"{res.seconds:.1f} s, {rate:,.0f} rows/s")
    if res.complete:
        table.add_row("durable", "yes: every row sent is checkpointed")
    else:
        table.add_row("durable", escape(f"not all: {res.problem}; run the same command again "
                                        "to resume (nothing is counted twice)"))
    return table
