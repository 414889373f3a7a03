"""The SQLite store of tuning results: every trial, the best per key, provenance and management.

One file is one portable cache. Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`,
``PRAGMA application_id`` = :data:`APPLICATION_ID` marks the file as ours):

- ``meta(name, value)``: format name, who created the file and when.
- ``result_keys``: one row per :class:`ResultKey` (kernel kind, static spec, token bucket, device,
  compute capability, Triton version, template hash, search-space hash), unique.
- ``trials``: every measurement of a config for a key (canonical JSON config, status, median /
  p20 / p80 ms, errors, host, time). ``fingerprint`` (a hash of all of it) is unique, so merging or
  importing the same trial twice is a no-op.
- ``best(key_id, trial_id, median_ms)``: the fastest eligible ``ok`` trial per key, kept in the same
  transaction as the trial that changes it. A config with a ``wrong-result`` or ``crash`` trial
  for a key is never best for that key, even if other runs of it were ``ok``.
- ``kernel_sources``: rendered kernel source per (kind, spec, template hash), for inspection only.
  It is never executed: the runtime always renders from its own installed templates.

Writes are ``BEGIN IMMEDIATE`` transactions, the file is in WAL mode with a busy timeout, so several
processes can write one file and a process killed at any moment leaves a consistent file. A write
that finds the file locked by another writer says so once and waits (up to :data:`LOCK_WAIT_S`);
large imports and merges commit in batches of :data:`BATCH_TRIALS`, so no writer holds the lock
for long. A measurement that still cannot be written is kept and written later, or at the latest
on close to a JSON file next to the cache (`flashmhf cache import` takes it): none is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flashmhf.cache.device import DeviceInfo
from flashmhf.cache.notice import CacheWarning
from flashmhf.cache.validity import STATUSES, trial_problem  # noqa: F401 - STATUSES is re-exported
from flashmhf.codegen.spec import Spec

SCHEMA_VERSION = 1
APPLICATION_ID = 0x464D4846  # "FMHF"
FORMAT = "flashmhf-tuning-cache"
# A config with one of these for a key is never that key's best, whatever its other trials say.
DISQUALIFYING = ("wrong-result", "crash")
BUSY_TIMEOUT_S = 2.0  # SQLite's own wait for a lock, before this module's retry loop speaks up
LOCK_WAIT_S = 600.0  # the longest a write waits for another writer's lock, in all
BATCH_TRIALS = 2000  # trials per transaction of an import or merge

_TABLES = ("meta", "result_keys", "trials", "best", "kernel_sources")


class CacheFileError(ValueError):
    """A cache file that cannot be used: not SQLite or corrupt, not ours, or a newer schema."""


class CachePlaceError(ValueError):
    """A cache file that is fine (or would be) in a place that cannot be written: a read-only file,
    folder or file system."""


class CacheLockedError(CacheFileError):
    """Another writer held the file's write lock for longer than :data:`LOCK_WAIT_S`."""


@dataclass(frozen=True, order=True)
class ResultKey:
    """What a tuning result is valid for: one kernel's spec (kind, layer shape, dtype) at a token
    ``bucket`` (the token count rounded up to a power of two) on a device, for a Triton version,
    template and search space. A ``result_keys`` row holds it flat: the spec's fields, then the
    rest (:data:`KEY_FIELDS`); so do exported documents and the filters of the read methods."""

    spec: Spec
    bucket: int
    device: str
    capability: str
    triton_version: str
    template_hash: str
    space_hash: str

    @classmethod
    def for_spec(cls, spec: Spec, bucket: int, device: DeviceInfo) -> ResultKey:
        """The key of ``spec`` at ``bucket`` on ``device`` for the installed templates and search space."""
        from flashmhf.codegen import get_kind, template_hash

        key = cls(spec, bucket, device.name, device.capability, device.triton_version, template_hash(spec.kind),
                  get_kind(spec.kind).space_hash)
        key.validate()
        return key

    @classmethod
    def from_columns(cls, values: Sequence[Any]) -> ResultKey:
        """The key of a flat row in :data:`KEY_FIELDS` order (unchecked: see :meth:`validate`)."""
        n = len(SPEC_FIELDS)
        return cls(Spec(*values[:n]), *values[n:])

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ResultKey:
        """The key of a flat dict with every field of :data:`KEY_FIELDS` (unchecked)."""
        return cls.from_columns([values[f] for f in KEY_FIELDS])

    def columns(self) -> tuple:
        """The flat row, in :data:`KEY_FIELDS` order."""
        return (*self.spec.as_tuple(), self.bucket, self.device, self.capability, self.triton_version,
                self.template_hash, self.space_hash)

    def to_dict(self) -> dict:
        """The flat row as a dict (an export's ``key`` object; filters for the read methods)."""
        return dict(zip(KEY_FIELDS, self.columns()))

    def label(self) -> str:
        return f"{self.spec.label()} T<={self.bucket} on {self.device} (sm {self.capability})"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field if this key cannot be stored."""
        if not isinstance(self.spec, Spec):
            raise ValueError(f"ResultKey.spec must be a Spec, got {self.spec!r}")
        for name, value in zip(KEY_FIELDS, self.columns()):
            if name in _INT_FIELDS:
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ValueError(f"ResultKey.{name} must be a positive integer, got {value!r}")
            elif not isinstance(value, str) or not value:
                raise ValueError(f"ResultKey.{name} must be a non-empty string, got {value!r}")
        if self.bucket & (self.bucket - 1):
            raise ValueError(f"ResultKey.bucket must be a power of two (token bucket), got {self.bucket}")


# The columns of a key: the spec's fields, then the rest of the key's.
SPEC_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Spec))
KEY_FIELDS: tuple[str, ...] = SPEC_FIELDS + tuple(f.name for f in fields(ResultKey) if f.name != "spec")
_INT_FIELDS = frozenset(f.name for f in fields(Spec) if f.type == "int") | {"bucket"}


@dataclass(frozen=True)
class Trial:
    """One measurement of one config for one key."""

    config: dict
    status: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    error: str | None = None
    recorded_at: str = ""
    host: str = ""
    torch_version: str = ""
    source: str | None = None  # who produced it (e.g. a study name, "import:<file>")
    key: ResultKey | None = None
    id: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def canonical_config(self) -> str:
        return canonical_config(self.config)


def canonical_config(config: dict) -> str:
    """Canonical JSON of a config (sorted keys, no spaces): the identity of a config in the store."""
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise ValueError(f"config must be a dict with string keys, got {config!r}")
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable, got {config!r} ({exc})") from None


def flashmhf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flashmhf")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _fingerprint(key: ResultKey, row: dict) -> str:
    payload = {**key.to_dict(), **{k: row[k] for k in _TRIAL_CONTENT}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


_TRIAL_CONTENT = ("config", "status", "median_ms", "p20_ms", "p80_ms", "torch_version", "error", "source", "host",
                  "recorded_at")
TRIAL_FIELDS = _TRIAL_CONTENT  # a trial's content, as stored and exported
_TEXT_FIELDS = ("torch_version", "host", "recorded_at")  # strings; error and source may also be null


def stored_trial_problem(key: ResultKey, row: dict) -> str | None:
    """Why a trial read from a file (config as stored JSON text) cannot be used, or None."""
    try:
        key.validate()
    except ValueError as exc:
        return f"key: {exc}"
    return stored_row_problem(key.spec.kind, row)


def stored_row_problem(kind: str, row: dict) -> str | None:
    """:func:`stored_trial_problem` without the key's own checks."""
    try:
        config = json.loads(row["config"]) if isinstance(row["config"], str) else None
    except (ValueError, RecursionError):
        config = None
    if config is None:
        return f"config is not a JSON object: {str(row['config'])[:60]!r}"
    for name in _TEXT_FIELDS:
        if not isinstance(row.get(name), str):
            return f"{name} must be text, got {row.get(name)!r:.40}"
    for name in ("error", "source"):
        if row.get(name) is not None and not isinstance(row[name], str):
            return f"{name} must be text or null, got {row[name]!r:.40}"
    return trial_problem(kind, {**row, "config": config})


def portable_document(grouped: dict[ResultKey, list[dict]], bests: dict[ResultKey, dict] | None = None) -> dict:
    """The JSON export document of trials (config as an object) grouped by key."""
    results = [{"key": key.to_dict(), "best": (bests or {}).get(key), "trials": trials}
               for key, trials in sorted(grouped.items())]
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "exported_at": utc_now(),
            "exported_by": f"flashmhf {flashmhf_version()}", "results": results}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS result_keys (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL, n_heads INTEGER NOT NULL, n_kv_heads INTEGER NOT NULL, head_dim INTEGER NOT NULL,
    n_experts INTEGER NOT NULL, expert_dim INTEGER NOT NULL, dtype TEXT NOT NULL, bucket INTEGER NOT NULL,
    device TEXT NOT NULL, capability TEXT NOT NULL, triton_version TEXT NOT NULL,
    template_hash TEXT NOT NULL, space_hash TEXT NOT NULL,
    UNIQUE ({", ".join(KEY_FIELDS)})
);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY,
    key_id INTEGER NOT NULL REFERENCES result_keys(id),
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    median_ms REAL, p20_ms REAL, p80_ms REAL,
    torch_version TEXT NOT NULL DEFAULT '',
    error TEXT, source TEXT,
    host TEXT NOT NULL DEFAULT '',
    recorded_at TEXT NOT NULL,
    fingerprint TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS trials_by_key ON trials(key_id, config);
CREATE TABLE IF NOT EXISTS best (
    key_id INTEGER PRIMARY KEY REFERENCES result_keys(id),
    trial_id INTEGER NOT NULL REFERENCES trials(id),
    median_ms REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kernel_sources (
    kind TEXT NOT NULL, n_heads INTEGER NOT NULL, n_kv_heads INTEGER NOT NULL, head_dim INTEGER NOT NULL,
    n_experts INTEGER NOT NULL, expert_dim INTEGER NOT NULL, dtype TEXT NOT NULL, template_hash TEXT NOT NULL,
    source TEXT NOT NULL, sha256 TEXT NOT NULL, recorded_at TEXT NOT NULL,
    PRIMARY KEY (kind, n_heads, n_kv_heads, head_dim, n_experts, expert_dim, dtype, template_hash)
);
"""

_DISQ_SQL = ", ".join(f"'{s}'" for s in DISQUALIFYING)
# The eligible ok trials of every key (or of one key: ``{where}`` = "AND t.key_id = :key"), ranked
# per key: fastest first, exact ties broken by config text (so merge order never matters). The
# disqualified (key, config) pairs are collected once, not looked up per trial: linear in trials.
_RANKED_OK = f"""
SELECT t.key_id, t.id, t.median_ms,
       ROW_NUMBER() OVER (PARTITION BY t.key_id ORDER BY t.median_ms, t.config, t.id) AS rn
FROM trials t
WHERE t.status = 'ok' AND t.median_ms IS NOT NULL {{where}}
  AND (t.key_id, t.config) NOT IN (SELECT t.key_id, t.config FROM trials t
                                   WHERE t.status IN ({_DISQ_SQL}) {{where}})
"""
_RECOMPUTE_BEST = f"""
INSERT OR REPLACE INTO best (key_id, trial_id, median_ms)
SELECT key_id, id, median_ms FROM ({_RANKED_OK}) WHERE rn = 1
"""

# Connections inherited across fork are abandoned, never closed, in the child (closing them there
# could drop the parent's locks); keeping a reference stops the garbage collector from closing them.
_abandoned: list[sqlite3.Connection] = []


def _is_unwritable(exc: sqlite3.DatabaseError) -> bool:
    msg = str(exc).lower()
    return "readonly" in msg or "read-only" in msg or "unable to open" in msg


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def _where(filters: dict[str, Any], prefix: str = "") -> tuple[str, list]:
    """SQL condition for key-field filters: a scalar matches equal, a list/tuple/set any of; None is ignored."""
    clauses, params = [], []
    for name, value in filters.items():
        if name not in KEY_FIELDS:
            raise ValueError(f"filter must be one of {', '.join(KEY_FIELDS)}, got {name!r}")
        if value is None:
            continue
        if isinstance(value, (list, tuple, set, frozenset)):
            values = list(value)
            if not values:
                clauses.append("0")
                continue
            clauses.append(f"{prefix}{name} IN ({', '.join('?' * len(values))})")
            params.extend(values)
        else:
            clauses.append(f"{prefix}{name} = ?")
            params.append(value)
    return (" AND ".join(clauses) or "1"), params


class TuningCache:
    """One tuning-cache file, opened (and created unless ``readonly``) at ``path``.

    Raises :class:`CacheFileError` for a file that is not SQLite or corrupt, not a flashmhf cache,
    or of a newer schema; ``FileNotFoundError`` when ``readonly`` and the file does not exist.
    Each process should open its own instance (a connection inherited through fork is replaced).
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.readonly = readonly
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._pending: list[tuple[ResultKey, dict]] = []  # measurements a lock kept back
        if self.path.is_dir():
            raise CacheFileError(f"{self.path}: is a directory, not a cache file")
        if readonly and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such cache file")
        self._connect()

    # ---- opening -------------------------------------------------------------------------------

    def _connect(self) -> None:
        import sqlite_utils

        if not self.readonly:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CachePlaceError(f"{self.path}: cannot create its folder ({exc.strerror}); give a writable "
                                      "--cache path or set FLASHMHF_CACHE_DIR") from None
        try:
            self._conn = self._open_connection()
            self._pid = os.getpid()
            self.db = sqlite_utils.Database(self._conn, execute_plugins=False)
            self._check_or_create()
            if not self.readonly:
                self._check_writable()
        except sqlite3.DatabaseError as exc:
            self.close()
            if not self.readonly and _is_unwritable(exc):
                raise CachePlaceError(self._unwritable_message()) from None
            raise CacheFileError(f"{self.path}: not a usable SQLite file ({exc})") from None
        except CacheFileError:
            self.close()
            raise

    def _check_writable(self) -> None:
        """Fail now, not at the first measurement, when the file or its folder is read-only: a
        write that is rolled back (taking the lock itself succeeds on a read-only file)."""
        conn = self.conn
        self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            conn.execute("UPDATE meta SET value = value || '' WHERE name = 'format'")
        finally:
            conn.execute("ROLLBACK")

    def _unwritable_message(self) -> str:
        if self.path.is_file():
            try:
                TuningCache(self.path, readonly=True).close()
                state = "the file is a fine cache, but this place is read-only (file or file system)"
            except (CacheFileError, OSError):
                state = "it cannot be written here (read-only file or file system)"
            return f"{self.path}: cannot write to this cache file: {state}; give a writable --cache path"
        return (f"{self.path}: cannot create a cache file here: its folder is not writable (read-only file "
                "system or permissions); give a writable --cache path or set FLASHMHF_CACHE_DIR")

    def _open_connection(self) -> sqlite3.Connection:
        kw = dict(timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        if not self.readonly:
            return sqlite3.connect(str(self.path), **kw)
        uri = self.path.resolve().as_uri()
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, **kw)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as exc:
            # A WAL file in a read-only folder (e.g. shipped in site-packages) cannot get its -shm:
            # read it as immutable. What is still in its -wal file is then invisible: say so.
            if "unable to open" not in str(exc) and "readonly" not in str(exc):
                raise
            conn.close()
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.is_file() and wal.stat().st_size > 0:
                warnings.warn(
                    f"flashmhf: {self.path} is in WAL mode in a read-only place and its {wal.name} cannot be read "
                    "here: results written since its last checkpoint are not visible. Open it once where it is "
                    "writable, or ship a single-file copy (`flashmhf cache export -o NAME.sqlite`)",
                    CacheWarning, stacklevel=4)
            return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, **kw)

    def _header(self) -> tuple[int, int, set[str]]:
        conn = self.conn
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return app_id, version, tables

    def _check_or_create(self) -> None:
        app_id, version, tables = self._header()
        if app_id == 0 and version == 0 and not tables:
            if self.readonly:
                raise CacheFileError(f"{self.path}: empty file, not a flashmhf tuning cache")
            self._create()
            app_id, version, tables = self._header()
        if app_id != APPLICATION_ID:
            raise CacheFileError(
                f"{self.path}: an SQLite file but not a flashmhf tuning cache "
                f"(application_id {app_id:#x}, expected {APPLICATION_ID:#x})"
            )
        if version > SCHEMA_VERSION:
            raise CacheFileError(
                f"{self.path}: cache schema version {version} is newer than this flashmhf supports "
                f"({SCHEMA_VERSION}); upgrade flashmhf to read it"
            )
        if version < SCHEMA_VERSION:  # no older schema has ever been released
            raise CacheFileError(f"{self.path}: unknown old cache schema version {version}")
        missing = [t for t in _TABLES if t not in tables]
        if missing:
            raise CacheFileError(f"{self.path}: damaged flashmhf cache (missing tables {', '.join(missing)})")
        if not self.readonly:
            if self.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                self._retry(lambda: self.conn.execute("PRAGMA journal_mode = WAL").fetchone())
            self.conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: consistent after a crash

    def _create(self) -> None:
        with self._write():
            app_id, _, tables = self._header()
            if tables or app_id:  # another process created it while we waited for the lock
                return
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db["meta"].insert_all(
                [{"name": "format", "value": FORMAT}, {"name": "created_at", "value": utc_now()},
                 {"name": "created_by", "value": f"flashmhf {flashmhf_version()}"}], replace=True,
            )

    @property
    def conn(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # forked: never use the parent's connection
            if self._conn is not None:
                _abandoned.append(self._conn)
            self._conn = None
            self._connect()
        if self._conn is None:
            raise ValueError(f"{self.path}: this TuningCache is closed")
        return self._conn

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._save_pending()
            self._conn.close()
        self._conn = None

    def __enter__(self) -> TuningCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TuningCache({str(self.path)!r}{', readonly=True' if self.readonly else ''})"

    # ---- transactions --------------------------------------------------------------------------

    def _retry(self, fn):
        """``fn()``, retried while another writer holds the lock: said once, then up to LOCK_WAIT_S."""
        start, attempt, said = time.monotonic(), 0, False
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                waited = time.monotonic() - start
                if waited >= LOCK_WAIT_S:
                    raise CacheLockedError(f"{self.path}: locked by another writer for {waited:.0f} s; gave up") \
                        from None
                if not said:
                    said = True
                    warnings.warn(f"flashmhf: {self.path} is locked by another writer; waiting for it "
                                  f"(up to {LOCK_WAIT_S:.0f} s)", CacheWarning, stacklevel=4)
                time.sleep(min(0.05 * 2**attempt, 2.0))
                attempt += 1

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock up front so it cannot deadlock with readers."""
        if self.readonly:
            raise ValueError(f"{self.path}: opened read-only")
        with self._lock:
            conn = self.conn
            self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            else:
                try:
                    self._retry(lambda: conn.execute("COMMIT"))
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

    # ---- writes --------------------------------------------------------------------------------

    def _key_id(self, conn: sqlite3.Connection, key: ResultKey) -> int:
        values = list(key.columns())
        conn.execute(
            f"INSERT OR IGNORE INTO result_keys ({', '.join(KEY_FIELDS)}) VALUES ({', '.join('?' * len(values))})",
            values,
        )
        cond = " AND ".join(f"{f} = ?" for f in KEY_FIELDS)
        return conn.execute(f"SELECT id FROM result_keys WHERE {cond}", values).fetchone()[0]

    def _insert_trial(self, conn: sqlite3.Connection, key_id: int, key: ResultKey, row: dict) -> int | None:
        """Insert one trial row (content fields of :data:`_TRIAL_CONTENT`); None if already present."""
        fp = _fingerprint(key, row)
        cur = conn.execute(
            f"INSERT OR IGNORE INTO trials (key_id, {', '.join(_TRIAL_CONTENT)}, fingerprint) "
            f"VALUES (?, {', '.join('?' * len(_TRIAL_CONTENT))}, ?)",
            [key_id, *(row[k] for k in _TRIAL_CONTENT), fp],
        )
        return cur.lastrowid if cur.rowcount else None

    def _recompute_best(self, conn: sqlite3.Connection, key_ids: Iterable[int] | None = None) -> None:
        if key_ids is None:
            conn.execute("DELETE FROM best")
            conn.execute(_RECOMPUTE_BEST.format(where=""))
            return
        for key_id in set(key_ids):
            conn.execute("DELETE FROM best WHERE key_id = ?", (key_id,))
            conn.execute(_RECOMPUTE_BEST.format(where="AND t.key_id = :key"), {"key": key_id})

    def record_trial(
        self, key: ResultKey, config: dict, status: str, *, median_ms: float | None = None,
        p20_ms: float | None = None, p80_ms: float | None = None, torch_version: str = "",
        error: str | None = None, source: str | None = None,
    ) -> None:
        """Store one trial and, in the same transaction, the key's best row if this trial changes it.

        A trial that cannot be written because another writer holds the lock for too long is kept
        and written with the next one, or on :meth:`close` (see the module's docstring)."""
        key.validate()
        problem = trial_problem(key.spec.kind, {"config": config, "status": status, "median_ms": median_ms,
                                           "p20_ms": p20_ms, "p80_ms": p80_ms})
        if problem:
            raise ValueError(problem)
        row = {
            "config": canonical_config(config), "status": status,
            "median_ms": None if median_ms is None else float(median_ms),
            "p20_ms": None if p20_ms is None else float(p20_ms),
            "p80_ms": None if p80_ms is None else float(p80_ms),
            "torch_version": torch_version or "", "error": error, "source": source,
            "host": socket.gethostname(), "recorded_at": utc_now(),
        }
        self._pending.append((key, row))
        try:
            with self._write() as conn:
                for pending_key, pending_row in self._pending:
                    self._record(conn, pending_key, pending_row)
        except CacheLockedError as exc:
            warnings.warn(f"flashmhf: {exc}; {len(self._pending)} measurement(s) kept, to be written with the "
                          "next one or when the cache is closed", CacheWarning, stacklevel=2)
            return
        self._pending.clear()

    def _record(self, conn: sqlite3.Connection, key: ResultKey, row: dict) -> None:
        """Insert one trial row and update its key's best row (inside a write transaction)."""
        key_id = self._key_id(conn, key)
        trial_id = self._insert_trial(conn, key_id, key, row)
        if trial_id is None:
            return
        best = conn.execute(
            "SELECT t.config, b.median_ms FROM best b JOIN trials t ON t.id = b.trial_id WHERE b.key_id = ?", (key_id,)
        ).fetchone()
        if row["status"] in DISQUALIFYING:
            if best is not None and best[0] == row["config"]:
                self._recompute_best(conn, [key_id])
        elif row["status"] == "ok" and (best is None or (row["median_ms"], row["config"]) < (best[1], best[0])):
            disqualified = conn.execute(
                f"SELECT 1 FROM trials WHERE key_id = ? AND config = ? AND status IN ({_DISQ_SQL}) LIMIT 1",
                (key_id, row["config"]),
            ).fetchone()
            if not disqualified:
                conn.execute("INSERT OR REPLACE INTO best (key_id, trial_id, median_ms) VALUES (?, ?, ?)",
                             (key_id, trial_id, row["median_ms"]))

    def _save_pending(self) -> None:
        """On close: write the measurements kept back by a lock, or else put them in a JSON file
        next to the cache that `flashmhf cache import` takes."""
        if not self._pending:
            return
        try:
            with self._write() as conn:
                for key, row in self._pending:
                    self._record(conn, key, row)
        except CacheLockedError:
            grouped: dict[ResultKey, list[dict]] = {}
            for key, row in self._pending:
                grouped.setdefault(key, []).append({**row, "config": json.loads(row["config"])})
            side = self.path.with_name(f"{self.path.name}.pending-{os.getpid()}-{time.time_ns()}.json")
            side.write_text(json.dumps(portable_document(grouped), indent=1, sort_keys=True) + "\n", encoding="utf-8")
            warnings.warn(f"flashmhf: {self.path} stayed locked; {len(self._pending)} measurement(s) written to "
                          f"{side}: add them with `flashmhf cache import {side} --cache {self.path}`",
                          CacheWarning, stacklevel=3)
        self._pending.clear()

    def record_source(self, spec: Spec, source: str | None = None) -> None:
        """Store the rendered source of ``spec`` (default: rendered now) under the installed template hash.

        For inspection only (``flashmhf cache show --source``); it is never executed.
        """
        from flashmhf.codegen import render, template_hash

        text = render(spec) if source is None else source
        row = {**spec.to_dict(), "template_hash": template_hash(spec.kind), "source": text,
               "sha256": hashlib.sha256(text.encode()).hexdigest(), "recorded_at": utc_now()}
        with self._write():
            self.db["kernel_sources"].insert(row, replace=True)

    def kernel_source(self, spec: Spec, template_hash: str | None = None) -> str | None:
        """The stored source of ``spec`` (for the installed template hash by default), or None."""
        from flashmhf.codegen import template_hash as current_hash

        th = template_hash or current_hash(spec.kind)
        cond = " AND ".join(f"{k} = ?" for k in spec.to_dict())
        row = self.conn.execute(
            f"SELECT source FROM kernel_sources WHERE {cond} AND template_hash = ?", [*spec.to_dict().values(), th]
        ).fetchone()
        return None if row is None else row[0]

    def delete(self, **filters: Any) -> int:
        """Delete the keys matching ``filters`` (key fields) with their trials and bests; returns trials deleted."""
        cond, params = _where(filters)
        with self._write() as conn:
            ids = f"SELECT id FROM result_keys WHERE {cond}"
            conn.execute(f"DELETE FROM best WHERE key_id IN ({ids})", params)
            n = conn.execute(f"DELETE FROM trials WHERE key_id IN ({ids})", params).rowcount
            conn.execute(f"DELETE FROM result_keys WHERE {cond}", params)
        return n

    def delete_keys(self, keys: Iterable[ResultKey]) -> int:
        """Delete exactly these keys (with trials and bests); returns trials deleted."""
        return sum(self.delete(**k.to_dict()) for k in keys)

    def add_trials(self, items: Iterable[tuple[ResultKey, dict]]) -> int:
        """Insert validated (key, trial row) pairs, skipping known ones, in transactions of
        :data:`BATCH_TRIALS` trials, each with the bests of the keys it touched; returns trials added."""
        added = 0
        batch: list[tuple[ResultKey, dict]] = []

        def flush() -> int:
            n = 0
            with self._write() as conn:
                touched = set()
                key_ids: dict[ResultKey, int] = {}
                for key, row in batch:
                    if key not in key_ids:
                        key_ids[key] = self._key_id(conn, key)
                    if self._insert_trial(conn, key_ids[key], key, row) is not None:
                        n += 1
                        touched.add(key_ids[key])
                self._recompute_best(conn, touched)
            batch.clear()
            return n

        for item in items:
            batch.append(item)
            if len(batch) >= BATCH_TRIALS:
                added += flush()
        if batch:
            added += flush()
        return added

    def merge_from(self, other_path: str | os.PathLike) -> tuple[int, list[str]]:
        """Copy every valid trial (and stored source) of another cache file into this one.

        Returns (trials added, problems of the rows skipped: bad keys, configs or times)."""
        with TuningCache(other_path, readonly=True) as other:
            rows = list(other.trial_rows())
            sources = list(other.db["kernel_sources"].rows)
        good, skipped = [], []
        for key, row in rows:
            problem = stored_trial_problem(key, row)
            if problem:
                skipped.append(f"trial {row['id']}: {problem}")
            else:
                good.append((key, {**row, "config": canonical_config(json.loads(row["config"]))}))
        added = self.add_trials(good)
        if sources:
            with self._write():
                self.db["kernel_sources"].insert_all(sources, ignore=True)
        return added, skipped

    def copy_to(self, dest: str | os.PathLike, **filters: Any) -> int:
        """Write the keys matching ``filters`` (all trials, stored sources) to a new self-contained file.

        The copy uses a rollback journal, not WAL, so it is one file that reads from a read-only
        folder: the form to ship inside the package (``flashmhf/cache/shipped/<device>.sqlite``).
        Returns the number of trials written.
        """
        dest = Path(dest).expanduser()
        if dest.exists():
            raise ValueError(f"{dest}: already exists (copy_to writes a new file)")
        rows = list(self.matching_rows(**filters))
        specs = {k.spec for k, _ in rows}
        sources = [r for r in self.db["kernel_sources"].rows if Spec(*(r[c] for c in SPEC_FIELDS)) in specs]
        with TuningCache(dest) as out:
            n = out.add_trials(rows)
            if sources:
                with out._write():
                    out.db["kernel_sources"].insert_all(sources, ignore=True)
            out.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            out.conn.execute("PRAGMA journal_mode = DELETE")
        return n

    # ---- reads ---------------------------------------------------------------------------------

    def matching_rows(self, **filters: Any) -> Iterator[tuple[ResultKey, dict]]:
        """:meth:`trial_rows` of the keys matching ``filters`` (key fields)."""
        cond, params = _where(filters, prefix="k.")
        return self.trial_rows(cond, params)

    def trial_rows(self, cond: str = "1", params: list | None = None) -> Iterator[tuple[ResultKey, dict]]:
        """(key, raw trial row: config as stored text, ``id``) for the trials matching an SQL condition."""
        cols = ", ".join(f"k.{f}" for f in KEY_FIELDS) + ", " + ", ".join(f"t.{c}" for c in _TRIAL_CONTENT)
        sql = (f"SELECT {cols}, t.id FROM trials t JOIN result_keys k ON k.id = t.key_id WHERE {cond} "
               f"ORDER BY k.id, t.id")
        n = len(KEY_FIELDS)
        for r in self.conn.execute(sql, params or []):
            yield ResultKey.from_columns(r[:n]), {**dict(zip(_TRIAL_CONTENT, r[n:-1])), "id": r[-1]}

    @staticmethod
    def _trial(key: ResultKey, row: dict) -> Trial:
        try:
            config = json.loads(row["config"])
        except (TypeError, ValueError):
            config = {"<unparsable>": row["config"]}
        return Trial(config=config, key=key, **{k: row[k] for k in _TRIAL_CONTENT if k != "config"},
                     id=row.get("id"))

    def trials(self, key: ResultKey) -> list[Trial]:
        """Every trial of exactly ``key``, in the order recorded."""
        cond, params = _where(key.to_dict(), prefix="k.")
        return [self._trial(k, r) for k, r in self.trial_rows(cond, params)]

    def find_trials(self, **filters: Any) -> list[Trial]:
        """Every trial of the keys matching ``filters`` (key fields), grouped by key."""
        cond, params = _where(filters, prefix="k.")
        return [self._trial(k, r) for k, r in self.trial_rows(cond, params)]

    def best(self, key: ResultKey) -> Trial | None:
        """The fastest eligible ``ok`` trial of ``key``, or None."""
        rows = self.best_rows(**key.to_dict())
        return rows[0][1] if rows else None

    def best_rows(self, **filters: Any) -> list[tuple[ResultKey, Trial]]:
        """(key, best trial) for every key matching ``filters`` that has a best."""
        cond, params = _where(filters, prefix="k.")
        cols = ", ".join(f"k.{f}" for f in KEY_FIELDS) + ", " + ", ".join(f"t.{c}" for c in _TRIAL_CONTENT)
        sql = (f"SELECT {cols}, t.id FROM best b JOIN result_keys k ON k.id = b.key_id "
               f"JOIN trials t ON t.id = b.trial_id WHERE {cond} ORDER BY k.id")
        n = len(KEY_FIELDS)
        out = []
        for r in self.conn.execute(sql, params):
            key = ResultKey.from_columns(r[:n])
            out.append((key, self._trial(key, {**dict(zip(_TRIAL_CONTENT, r[n:-1])), "id": r[-1]})))
        return out

    def measured_configs(self, key: ResultKey, *, ignore_space_hash: bool = True) -> dict[str, Trial]:
        """Canonical config -> its most telling trial, over keys equal to ``key`` (but for space_hash).

        So a tuner can reuse every measurement already made after its search space changed. Per
        config: a ``wrong-result``/``crash`` trial if there is one (never retry it), else the
        fastest ``ok`` trial, else the latest failure.
        """
        filters = key.to_dict()
        if ignore_space_hash:
            filters.pop("space_hash")
        out: dict[str, Trial] = {}

        def rank(t: Trial) -> tuple:
            if t.status in DISQUALIFYING:
                return (0, 0.0)
            if t.ok:
                return (1, t.median_ms)
            return (2, 0.0)

        for trial in self.find_trials(**filters):
            c = trial.canonical_config()
            prev = out.get(c)
            if prev is None or rank(trial) < rank(prev) or (rank(trial) == rank(prev) and not trial.ok):
                out[c] = trial
        return out

    def keys(self, **filters: Any) -> list[ResultKey]:
        """Every key matching ``filters`` (key fields: a value, or a list of values), sorted."""
        cond, params = _where(filters)
        rows = self.conn.execute(f"SELECT {', '.join(KEY_FIELDS)} FROM result_keys WHERE {cond}", params)
        return sorted(ResultKey.from_columns(r) for r in rows)

    def quick_check(self) -> str | None:
        """The first problem SQLite's ``quick_check`` finds in the file's pages, or None. A file whose
        header is fine may still have damaged pages that no query of ours happens to touch."""
        try:
            first = self.conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            return str(exc)
        return None if first == "ok" else first

    def counts(self, **filters: Any) -> dict[str, int]:
        """Numbers of keys, trials and best rows (matching ``filters``)."""
        cond, params = _where(filters)
        ids = f"SELECT id FROM result_keys WHERE {cond}"
        one = lambda sql: self.conn.execute(sql, params).fetchone()[0]
        return {
            "keys": one(f"SELECT count(*) FROM ({ids})"),
            "trials": one(f"SELECT count(*) FROM trials WHERE key_id IN ({ids})"),
            "best": one(f"SELECT count(*) FROM best WHERE key_id IN ({ids})"),
        }

    # ---- checks --------------------------------------------------------------------------------

    def check(self) -> tuple[list[str], list[str]]:
        """(errors, warnings) about this file. Stale results (other template hash) are warnings."""
        try:
            return self._check()
        except sqlite3.DatabaseError as exc:  # a damaged page deeper than the header
            return [f"unreadable: {exc}"], []

    def _check(self) -> tuple[list[str], list[str]]:
        errors: list[str] = []
        warnings: list[str] = []
        conn = self.conn
        app_id, version, _ = self._header()
        if app_id != APPLICATION_ID or version != SCHEMA_VERSION:
            errors.append(f"header: application_id {app_id:#x}, schema version {version}")
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if integrity != ["ok"]:
            errors += [f"integrity: {line}" for line in integrity[:20]]
            return errors, warnings  # nothing below can be trusted
        for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check"):
            errors.append(f"{table} row {rowid}: dangling reference to {parent}")
        errors += self._check_rows()
        errors += self._check_best()
        e, w = self._check_provenance()
        return errors + e, warnings + w

    def _check_rows(self) -> list[str]:
        errors = []
        for key_id, *values in self.conn.execute(f"SELECT id, {', '.join(KEY_FIELDS)} FROM result_keys"):
            try:
                ResultKey.from_columns(values).validate()
            except ValueError as exc:
                errors.append(f"key {key_id}: {exc}")
        for key, row in self.trial_rows():
            if problem := stored_row_problem(key.spec.kind, row):
                errors.append(f"trial {row['id']} ({key.spec.kind}, bucket {key.bucket!r}): {problem}")
        return errors

    def _check_best(self) -> list[str]:
        errors = []
        expected = {
            key_id: median for key_id, _, median, rank in self.conn.execute(_RANKED_OK.format(where="")) if rank == 1
        }
        actual = {}
        for key_id, trial_id, median, t_key, t_status, t_median in self.conn.execute(
            "SELECT b.key_id, b.trial_id, b.median_ms, t.key_id, t.status, t.median_ms "
            "FROM best b LEFT JOIN trials t ON t.id = b.trial_id"
        ):
            actual[key_id] = median
            if t_key != key_id or t_status != "ok" or t_median != median:
                errors.append(f"best of key {key_id}: points at trial {trial_id}, which is not an ok trial of it")
        for key_id in sorted(expected.keys() | actual.keys()):
            if expected.get(key_id) != actual.get(key_id):
                errors.append(
                    f"best of key {key_id}: recorded {actual.get(key_id)} ms, its trials say {expected.get(key_id)} ms"
                )
        return errors

    def _check_provenance(self) -> tuple[list[str], list[str]]:
        """Stale template hashes and other Triton versions (warnings); stored sources vs a fresh render."""
        from flashmhf.codegen import KINDS, SpecError, render, template_hash

        errors, warnings = [], []
        from flashmhf.cache.device import _versions

        triton_now = _versions()[0]
        for kind, th, triton_version, n in self.conn.execute(
            "SELECT kind, template_hash, triton_version, count(*) FROM result_keys GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ):
            if kind not in KINDS:
                warnings.append(f"{n} key(s) of kind {kind!r}, unknown to this flashmhf: not used")
            elif th != template_hash(kind):
                warnings.append(
                    f"stale: {n} {kind} key(s) tuned with template {th} (installed {template_hash(kind)}): not used; "
                    "re-tune or `flashmhf cache rm --stale`"
                )
            elif triton_version != triton_now:
                warnings.append(f"{n} {kind} key(s) tuned under Triton {triton_version} (running {triton_now}): "
                                "used only where nothing is tuned under this Triton; re-tune to refresh them")
        n, spec_cols = len(SPEC_FIELDS), ", ".join(SPEC_FIELDS)
        for row in self.conn.execute(f"SELECT {spec_cols}, template_hash, source, sha256 FROM kernel_sources"):
            spec, (th, text, sha) = Spec(*row[:n]), row[n:]
            if hashlib.sha256(text.encode()).hexdigest() != sha:
                errors.append(f"stored source of {spec.label()} (template {th}): checksum mismatch")
                continue
            if spec.kind in KINDS and th == template_hash(spec.kind):
                try:
                    fresh = render(spec)
                except SpecError as exc:
                    warnings.append(f"stored source of {spec.label()}: spec no longer renders ({exc})")
                    continue
                if fresh != text:
                    warnings.append(f"stored source of {spec.label()} differs from a fresh render of template {th}")
        return errors, warnings

    def verify(self) -> list[str]:
        """Problems found by :meth:`check`: errors, then warnings prefixed ``warning:``."""
        errors, warnings = self.check()
        return errors + [f"warning: {w}" for w in warnings]

