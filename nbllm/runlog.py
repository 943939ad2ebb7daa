"""The run log: every generation of every kernel, one row each, in one SQLite file.

The kernel's engine hands each finished result to :func:`log_results`' writer (magics, API, chat,
panels, sweeps alike); a background thread completes its record (the weights' sha256 may still be
hashing) and inserts the row, so no generation waits for the disk. The file is in WAL mode with a busy
timeout, so several kernels write to it at once. Results answered by a replay are not logged (nothing
was generated), nor requests that never started (superseded before their first token, or refused).

Where: ``NBLLM_RUN_LOG`` (a file; ``off`` turns the log off), else ``runs.sqlite`` in the user's data
directory (``platformdirs.user_data_dir("nbllm")``: ``~/.local/share/nbllm`` on Linux).
:func:`runs` (``nbllm.runs``, ``%llm_runs``) returns the rows as a pandas DataFrame.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .errors import NbllmError, OptionError, pandas_module
from .frontend import command
from .identity import identity_key, record_identity
from .options import GenerationOptions, LoadOptions
from .result import Result

T = TypeVar("T")

if TYPE_CHECKING:
    import pandas

SCHEMA_VERSION = 1
SESSION = uuid.uuid4().hex[:12]
"""This process's id in the log's ``session`` column (one kernel, one session)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    record_id TEXT NOT NULL,
    created TEXT NOT NULL,
    session TEXT NOT NULL,
    model TEXT,
    loader TEXT,
    mode TEXT,
    prompt TEXT,
    messages TEXT,
    text TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    time_to_first_token REAL,
    total_seconds REAL,
    tokens_per_second REAL,
    seed INTEGER,
    seed_drawn INTEGER,
    conversation TEXT,
    batch TEXT,
    identity TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_model ON runs (model);
CREATE INDEX IF NOT EXISTS runs_identity ON runs (identity);
"""

_ROW_FIELDS = (
    "id", "record_id", "created", "session", "model", "loader", "mode", "prompt", "messages", "text", "finish_reason",
    "prompt_tokens", "completion_tokens", "time_to_first_token", "total_seconds", "tokens_per_second", "seed",
    "seed_drawn", "conversation", "batch", "identity", "record",
)
_JSON_FIELDS = ("messages", "conversation", "batch", "record")


def default_path() -> Path | None:
    """The run log's file: ``NBLLM_RUN_LOG``, else ``runs.sqlite`` in the user's data directory;
    ``None`` when ``NBLLM_RUN_LOG`` is ``off``."""
    configured = os.environ.get("NBLLM_RUN_LOG", "").strip()
    if configured.lower() in ("off", "0", "false", "no"):
        return None
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("nbllm", appauthor=False)) / "runs.sqlite"


class RunLog:
    """One run log file: add finished results, read rows back (a DataFrame, or rows for replay)."""

    def __init__(self, path: str | Path | None = None) -> None:
        chosen = Path(path).expanduser() if path is not None else default_path()
        if chosen is None:
            raise NbllmError("the run log is off (NBLLM_RUN_LOG=off)", "unset NBLLM_RUN_LOG, or give the file to read")
        self.path = chosen

    @contextmanager
    def _connect(self, *, create: bool = True) -> Iterator[sqlite3.Connection]:
        if not create and not self.path.exists():
            raise NbllmError(f"there is no run log at {self.path}", "check the path (NBLLM_RUN_LOG names the log in use)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            try:
                self._prepare(db)
            except sqlite3.DatabaseError as exc:
                if getattr(exc, "sqlite_errorname", "") not in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
                    raise
                raise NbllmError(f"{self.path} is not a run log (not an SQLite file: {exc})",
                                 f"give the run log's file (runs.sqlite), or a saved notebook to {command('replay', 'FILE')}") from None
            yield db

    def _prepare(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA busy_timeout = 30000")
        # WAL is kept in the file: set it once. Two connections setting it on a new file at once get
        # "database is locked" at once, without the busy timeout's wait, so that is retried here.
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal" and _when_unlocked(
                lambda: db.execute("PRAGMA journal_mode = WAL").fetchone()[0]) != "wal":
            raise NbllmError(f"{self.path} cannot be put in WAL mode", "keep the run log on a local disk")
        db.execute("PRAGMA synchronous = NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise NbllmError(f"{self.path} was written by a newer nbllm (run log version {version})",
                             "upgrade nbllm, or point NBLLM_RUN_LOG at another file")
        if version < SCHEMA_VERSION:
            _when_unlocked(lambda: db.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};"))

    # -- writing ---------------------------------------------------------------------------------
    def add(self, result: Result) -> int:
        """Log a finished result (waits for its record to be complete); returns the row's id."""
        record = result.record
        if record is None:
            raise NbllmError("a result is logged once it has finished", "read it to the end first (.text)")
        outcome = {
            "text": "".join(result.chunks),
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "timings": asdict(result.timings),
        }
        return self.add_run(record.to_dict(), outcome)

    def add_run(self, record: Mapping[str, Any], outcome: Mapping[str, Any], *, session: str = SESSION) -> int:
        """Log one run: its record (as ``Record.to_dict()`` gives it) and what came out (``text``,
        ``finish_reason``, ``prompt_tokens``, ``completion_tokens``, ``timings``)."""
        timings = outcome.get("timings") or {}
        conversation = record.get("conversation")
        row = {
            "record_id": record.get("id") or uuid.uuid4().hex[:16],
            "created": record.get("created", ""),
            "session": session,
            "model": (record.get("model") or {}).get("name"),
            "loader": record.get("loader"),
            "mode": record.get("mode"),
            "prompt": record.get("prompt"),
            "messages": _json(record.get("messages")),
            "text": outcome.get("text", ""),
            "finish_reason": outcome.get("finish_reason"),
            "prompt_tokens": outcome.get("prompt_tokens"),
            "completion_tokens": outcome.get("completion_tokens"),
            "time_to_first_token": timings.get("time_to_first_token"),
            "total_seconds": timings.get("total_seconds"),
            "tokens_per_second": timings.get("decode_tokens_per_second"),
            "seed": record.get("seed"),
            "seed_drawn": record.get("seed_drawn"),
            "conversation": _json(conversation),
            "batch": _json(record.get("batch")),
            "identity": identity_key(record_identity(record)),  # as Record.identity() gives it
            "record": _json(record),
        }
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect() as db:
            cursor = db.execute(f"INSERT INTO runs ({names}) VALUES ({marks})", list(row.values()))
            return int(cursor.lastrowid or 0)

    # -- reading ---------------------------------------------------------------------------------
    def rows(self, *, last: int | None = None, model: str | None = None, session: str | None = None) -> list[dict[str, Any]]:
        """The logged runs, oldest first, as dicts (JSON columns decoded): the ``last`` N, of models whose
        name contains ``model``, of one ``session``."""
        _check_last(last)
        where, args = [], []
        if model:
            where.append("instr(lower(model), lower(?)) > 0")
            args.append(model)
        if session:
            where.append("session = ?")
            args.append(session)
        sql = f"SELECT {', '.join(_ROW_FIELDS)} FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if last is not None:
            sql += f" LIMIT {int(last)}"
        with self._connect(create=False) as db:
            found = db.execute(sql, args).fetchall()
        out = []
        for values in reversed(found):
            row = dict(zip(_ROW_FIELDS, values))
            for name in _JSON_FIELDS:
                row[name] = json.loads(row[name]) if row[name] else None
            row["seed_drawn"] = None if row["seed_drawn"] is None else bool(row["seed_drawn"])
            out.append(row)
        return out

    def frame(self, *, last: int | None = None, model: str | None = None, session: str | None = None,
              **where: Any) -> pandas.DataFrame:
        """The runs as a DataFrame, one row per run: what it was (model, loader, mode, prompt, a column per
        generation option), what came out (text, finish reason, tokens, speed) and its ids. ``where``
        keeps the rows whose column equals the value (``temperature=0``)."""
        _check_last(last)
        pd = pandas_module()
        rows = self.rows(model=model, session=session, last=None if where else last)
        frame = pd.DataFrame([_flat(row) for row in rows], columns=_frame_columns())
        frame["created"] = pd.to_datetime(frame["created"], utc=True)
        for name, value in where.items():
            if name not in frame.columns:
                raise NbllmError(f"the run log has no column {name!r}", f"filter on one of: {', '.join(frame.columns)}")
            frame = frame[frame[name] == value]
        if last is not None and where:
            frame = frame.tail(int(last))
        return frame.reset_index(drop=True)

    def sessions(self) -> list[str]:
        """The sessions (kernels) that logged runs here, in the order of their first run."""
        with self._connect(create=False) as db:
            return [row[0] for row in db.execute("SELECT session FROM runs GROUP BY session ORDER BY min(id)")]

    def __len__(self) -> int:
        if not self.path.exists():
            return 0
        with self._connect() as db:
            return int(db.execute("SELECT count(*) FROM runs").fetchone()[0])


def _check_last(last: int | None) -> None:
    """``last`` counts runs: a negative number (SQLite's ``LIMIT -1`` is no limit at all) is refused."""
    if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
        raise OptionError(f"last {last} is not a number of runs (SQLite would read it as every run)",
                          "give the number of latest runs to show: 0 or more")


def _when_unlocked(step: Callable[[], T], seconds: float = 30.0) -> T:
    """``step()``, tried again while SQLite answers "database is locked" (at most ``seconds``)."""
    deadline = time.monotonic() + seconds
    pause = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)  # another connection is setting the file up: a few milliseconds
        pause = min(pause * 2, 0.1)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, default=str)


def _option_names() -> list[str]:
    return [name for name in GenerationOptions.names() if name != "seed"]


def _frame_columns() -> list[str]:
    return [
        "id", "created", "model", "loader", "mode", "prompt", "text", "finish_reason", "prompt_tokens",
        "completion_tokens", "tokens_per_second", "time_to_first_token", "total_seconds", "seed", "seed_drawn",
        *_option_names(), "load_options", "messages", "conversation", "turn", "batch", "record_id", "identity", "session",
    ]


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    """One DataFrame row: the stored columns, plus the options from the stored record."""
    record = row["record"] or {}
    options = record.get("generation_options") or {}
    defaults = {s.name: s.default for s in GenerationOptions.specs()}
    conversation = row["conversation"] or {}
    out = {name: row[name] for name in _frame_columns() if name in row}
    for name in _option_names():
        value = options.get(name, defaults[name])
        out[name] = tuple(value) if isinstance(value, list) else value
    load = record.get("load_options") or {}
    load_defaults = {s.name: s.default for s in LoadOptions.specs()}
    out["load_options"] = {k: v for k, v in load.items() if k in load_defaults and v != load_defaults[k]}
    out["conversation"] = conversation.get("name")
    out["turn"] = conversation.get("turn")
    return out


class _Writer:
    """The background thread that logs the kernel's results (in the order they finished)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Result, Path]] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._failed: set[Path] = set()

    def put(self, result: Result) -> None:
        path = default_path()
        never_ran = not result.chunks and not result.token_ids and result.finish_reason in ("superseded", "error")
        if path is None or result.replayed or never_ran:
            return
        with self._cond:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="nbllm-runlog", daemon=True)
                self._thread.start()
        self._queue.put((result, path))

    def _loop(self) -> None:
        while True:
            result, path = self._queue.get()
            try:
                RunLog(path).add(result)
            except Exception as exc:  # a full disk or a read-only folder: say it once, never fail a cell
                if path not in self._failed:
                    self._failed.add(path)
                    print(f"note: the run log {path} cannot be written ({type(exc).__name__}: {exc}); runs are not "
                          "logged there (NBLLM_RUN_LOG names another file, or off)", file=sys.stderr)
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every result handed over so far is written; False if ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)


_WRITER = _Writer()
atexit.register(_WRITER.flush, 10.0)


class FinishesResults(Protocol):
    """What :func:`log_results` needs of an engine (:class:`nbllm.Engine` is one): a way to be told of each
    finished result. A protocol, so that the run log sits below the engine that uses it."""

    def on_result(self, callback: Callable[[Result], None]) -> Callable[[], None]: ...


def log_results(engine: FinishesResults) -> None:
    """Log every result ``engine`` finishes (the kernel's engine does, from its creation)."""
    engine.on_result(_WRITER.put)


def flush(timeout: float | None = None) -> bool:
    """Wait until the results finished so far are in the run log."""
    return _WRITER.flush(timeout)


def runs(last: int | None = None, model: str | None = None, *, path: str | Path | None = None,
         session: str | None = None, **where: Any) -> pandas.DataFrame:
    """The run log as a DataFrame (``nbllm.runs``): the ``last`` N runs, of models whose name contains
    ``model``, of one ``session``, with columns equal to ``where`` (``temperature=0``). Runs finished
    in this kernel are written first. ``path``: another log than this kernel's."""
    _check_last(last)
    flush()
    log = RunLog(path)
    if path is None and not log.path.exists():  # nothing generated yet
        return pandas_module().DataFrame(columns=_frame_columns())
    return log.frame(last=last, model=model, session=session, **where)
