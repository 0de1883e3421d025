"""A results store that thousands of training runs write into, safely, from many processes and hosts.

One directory:

    spec.json            rows, the per-row schema (name -> shape, dtype), claim expiry
    fixed/NAME.npy       arrays known before training, one entry per row (e.g. the class masks)
    shards/WORKER.rows   one append-only file per writer process: fixed-size records
                         (magic, crc32 of row and payload, row, payload); nobody else writes there
    claims/ROW.claim     who is training a row (written whole as its token, claims/tokens/ROW.ID, then
                         hard-linked into place; refreshed by heartbeats). Whoever removes a claim
                         (its owner releasing it, a writer taking over a stale one) first renames its
                         token, which only one can do: no claim is taken over twice or released by
                         another writer
    failed/ROW.json      why a row failed (e.g. "NaN loss at epoch 3")

A row is complete once its record is fully written and fsync'ed. Every read checks every record: its
magic, its length, its row's range and the crc32 over its row index and payload, so a writer killed
mid-record (SIGKILL, lost host) or a flipped bit anywhere in a record leaves nothing a reader takes as
data; the record is counted as rejected (`verify()`; `status()["rejected"]` until its row has been
recomputed), and its row is pending again, to be claimed once its claim expires. A write that fails (a
full disk) is cut back to the last whole record and raises StoreError; its rows stay pending. (Format
version 1 stores, whose crc32 covers the payload alone, are still read.) Writers never share a file, so
page-granular writes on a shared file system cannot corrupt a neighbour. Should two writers ever complete
the same row (an expired claim taken over while its owner was still alive), readers keep the first record
in (shard name, offset) order, so a row is never counted twice.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ffcv_transfer.store.files import atomic_path, atomic_write

STORE_FORMAT = "ffcv-transfer/store"
STORE_VERSION = 2
MAGICS = {1: b"FTR1", 2: b"FTR2"}  # record magic by format version
HEADER = np.dtype([("magic", "S4"), ("crc", "<u4"), ("row", "<u8")])
READ_BYTES = 8 << 20  # the buffer records are read through
CLAIM_WRITE_GRACE_S = 5.0  # a claim file still unreadable after this long was torn by a crash: stale
# per shard, the rows its rejected records ("rejected") and its torn last record ("torn") were written for
# (`ResultStore._row_written_for`; None: a row that cannot be told)
LostRows = dict[str, dict[str, list[int | None]]]


class StoreError(Exception):
    """A store that cannot be created, opened or written as asked; the message names the file."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def worker_name(label: str | None = None) -> str:
    """A writer name unique to this process (it names the writer's shard file), after an optional label
    saying which launcher's worker this is (e.g. "slurm-12_3", "gpu1")."""
    return "-".join(filter(None, [label, socket.gethostname(), str(os.getpid()), uuid.uuid4().hex[:8]]))


def _read_claim(path: Path) -> tuple[os.stat_result, bytes, dict[str, Any] | None]:
    """A claim file's status, bytes and content (None if it is not a claim's JSON object naming its worker:
    empty, torn, or written by something else), all of one file: the status is taken on the open file, so
    it cannot belong to a claim that replaced the one read. A claim that cannot be opened at all (a folder
    in its place, no permission) blocks its row for good, so it is an error naming the file."""
    try:
        with open(path, "rb") as f:
            seen, raw = os.fstat(f.fileno()), f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StoreError(f"{path}: not a readable claim file ({e.strerror}); remove it") from None
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return seen, raw, None
    return seen, raw, info if isinstance(info, dict) and isinstance(info.get("worker"), str) else None


def _claim_id(info: dict[str, Any] | None) -> str | None:
    """The claim's id, if it has a well-formed one (torn claims, and claims written without one, have none)."""
    claim_id = (info or {}).get("id")
    return claim_id if isinstance(claim_id, str) and re.fullmatch(r"[0-9a-f]{16}", claim_id) else None


def _process_is_dead(host: Any, pid: Any) -> bool:
    """Whether `pid` on `host` is known to no longer exist: only a process on this host can be looked up."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


def _owner_is_dead(claim: dict[str, Any]) -> bool:
    """A claim made on this host by a process that no longer exists (killed, crashed) is stale at once;
    claims from other hosts can only expire."""
    return _process_is_dead(claim.get("host"), claim.get("pid"))


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _holder_tag() -> str:
    """Who holds a claim's token while removing the claim: host and pid (so that a holder that died can be
    told from a live one), and a random part unique to the call."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def reserve_space(file: Any, size: int, name: str | Path) -> None:
    """Allocate the first `size` bytes of the open `file` before they are written, so that a full disk is
    an OSError (ENOSPC, EDQUOT) naming `name`: numpy's writes of a large array report a short write with no
    error number, and a write through a memory map becomes a SIGBUS. A file system that cannot allocate
    ahead (EOPNOTSUPP) is written as it goes."""
    try:
        os.posix_fallocate(file.fileno(), 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, e.strerror, str(name)) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _move_into_place(built: Path, path: Path) -> None:
    """Rename the folder `built` to `path` (absent or an empty folder); into a folder that already holds
    other files, move its entries, the spec last (the spec makes it a store)."""
    try:
        os.rename(built, path)
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    for entry in sorted(built.iterdir(), key=lambda entry: entry.name == "spec.json"):
        if entry.is_dir() and (path / entry.name).is_dir() and any((path / entry.name).iterdir()):
            raise StoreError(f"{path / entry.name}: already there and not empty: not a store's folder")
    for entry in sorted(built.iterdir(), key=lambda entry: entry.name == "spec.json"):
        os.replace(entry, path / entry.name)
    built.rmdir()


class ResultStore:
    """Open with `ResultStore(path)`; make with `ResultStore.create(path, num_rows, schema, fixed=...)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        spec_path = self.path / "spec.json"
        if not spec_path.exists():
            raise StoreError(f"{spec_path}: no store here (spec.json missing)")
        try:
            spec = json.loads(spec_path.read_text())
            self.num_rows = int(spec["num_rows"])
            self.claim_ttl_s = float(spec["claim_ttl_s"])
            self.schema = {
                name: (tuple(entry["shape"]), np.dtype(entry["dtype"])) for name, entry in spec["schema"].items()
            }
            self.fixed_names = list(spec.get("fixed", []))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{spec_path}: not a valid store spec ({type(e).__name__}: {e})") from None
        if spec.get("format") != STORE_FORMAT:
            raise StoreError(f"{spec_path}: not an ffcv-transfer store spec")
        self.version = int(spec.get("version", 1))
        if self.version not in MAGICS:
            raise StoreError(
                f"{spec_path}: store format version {self.version}; this ffcv-transfer reads versions "
                f"{', '.join(map(str, MAGICS))}: upgrade it"
            )
        self.record_dtype = np.dtype(
            HEADER.descr + [(name, dtype, shape) for name, (shape, dtype) in self.schema.items()]
        )
        self.magic = MAGICS[self.version]
        # the bytes each record's crc32 covers: from the row index on (version 1: the payload alone)
        self.checked_from = HEADER.fields["row"][1] if self.version >= 2 else HEADER.itemsize

    @classmethod
    def create(
        cls,
        path: str | Path,
        num_rows: int,
        schema: dict[str, tuple[tuple[int, ...], Any]],
        *,
        fixed: dict[str, np.ndarray] | None = None,
        claim_ttl_s: float = 1800.0,
        files: dict[str, bytes] | None = None,
    ) -> ResultStore:
        """Make an empty store for `num_rows` rows, each holding the arrays of `schema`
        (name -> (shape, dtype)); `fixed` arrays (first axis = rows) are stored once, up front; `files`
        (name -> content) are written beside them. The store appears whole or not at all: it is built in
        a folder beside `path` and renamed into place, so a failure (a full disk) or a kill leaves no
        half-made store (a kill may leave the hidden build folder, `.NAME.creating-*`, never a store)."""
        path = Path(path)
        if (path / "spec.json").exists():
            raise StoreError(f"{path}: a store already exists here")
        if num_rows < 1:
            raise StoreError(f"{path}: a store needs at least one row, got {num_rows}")
        fixed = fixed or {}
        for name, array in fixed.items():
            if len(array) != num_rows:
                raise StoreError(f"{path}: fixed array {name!r} has {len(array)} rows, the store {num_rows}")
            if name in schema:
                raise StoreError(f"{path}: {name!r} is both a fixed array and a per-row field")
        entries = {}
        for name, (shape, dtype) in schema.items():
            entries[name] = {
                "shape": [int(s) for s in np.atleast_1d(shape)] if shape != () else [],
                "dtype": np.dtype(dtype).str,
            }
        spec = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "num_rows": num_rows,
            "schema": entries,
            "fixed": sorted(fixed),
            "claim_ttl_s": claim_ttl_s,
            "created": _now(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        built = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:8]}"
        try:
            for sub in ("fixed", "shards", "claims", "failed"):
                (built / sub).mkdir(parents=True)
            for name, array in fixed.items():
                array = np.asarray(array)
                with open(built / "fixed" / f"{name}.npy", "w+b") as f:
                    reserve_space(f, array.nbytes + 4096, path)  # 4096: more than any .npy header
                    np.save(f, array)
                    f.truncate()
            for name, content in (files or {}).items():
                (built / name).write_bytes(content)
            atomic_write(built / "spec.json", (json.dumps(spec, indent=1) + "\n").encode())
            _move_into_place(built, path)
        except OSError as e:
            shutil.rmtree(built, ignore_errors=True)
            if e.filename is None:  # a failed write() names no file: name the store
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise
        except BaseException:
            shutil.rmtree(built, ignore_errors=True)
            raise
        return cls(path)

    # ------------------------------------------------------------ reading

    def fixed(self, name: str) -> np.ndarray:
        file = self.path / "fixed" / f"{name}.npy"
        if name not in self.fixed_names:
            raise StoreError(f"{self.path}: no fixed array {name!r} (have: {', '.join(self.fixed_names) or 'none'})")
        try:
            array = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StoreError(f"{file}: unreadable ({e})") from None
        if len(array) < self.num_rows:
            raise StoreError(f"{file}: {len(array)} rows, the store has {self.num_rows}")
        return array[: self.num_rows]  # longer after an `add_rows` cut off before its spec was written

    def add_rows(self, fixed: dict[str, np.ndarray]) -> range:
        """Grow the store by len(arrays) rows, given each fixed array's new rows; returns the new rows.
        Each fixed array is rewritten whole (old rows, then new; `files.atomic_path`), and the spec's row
        count is written last: a crash in between leaves the store as it was (readers take
        the first `num_rows` rows of a longer array), and a later `add_rows` starts over."""
        if sorted(fixed) != sorted(self.fixed_names):
            raise StoreError(
                f"{self.path}: new rows need every fixed array ({', '.join(self.fixed_names)}), "
                f"got {', '.join(sorted(fixed)) or 'none'}"
            )
        counts = {len(array) for array in fixed.values()}
        if len(counts) != 1 or 0 in counts:
            raise StoreError(f"{self.path}: the new rows' fixed arrays differ in length or are empty")
        count = counts.pop()
        for name, new in fixed.items():
            old = self.fixed(name)
            new = np.asarray(new)
            if new.shape[1:] != old.shape[1:] or new.dtype != old.dtype:
                raise StoreError(
                    f"{self.path}: fixed array {name!r} holds {old.dtype} rows of shape "
                    f"{old.shape[1:]}, the new rows are {new.dtype} {new.shape[1:]}"
                )
            with atomic_path(self.path / "fixed" / f"{name}.npy") as partial:
                grown = np.lib.format.open_memmap(partial, "w+", old.dtype, (len(old) + count, *old.shape[1:]))
                for start in range(0, len(old), 65536):  # in blocks: example masks can be gigabytes
                    block = slice(start, min(start + 65536, len(old)))
                    grown[block] = old[block]
                grown[len(old) :] = new
                grown.flush()
                del grown
        spec = json.loads((self.path / "spec.json").read_text())
        first = int(spec["num_rows"])
        spec["num_rows"] = first + count
        atomic_write(self.path / "spec.json", (json.dumps(spec, indent=1) + "\n").encode())
        self.num_rows = first + count
        return range(first, first + count)

    def _shards(self) -> list[Path]:
        return sorted((self.path / "shards").glob("*.rows"))

    def _read_records(self, shard: Path) -> Iterator[np.ndarray]:
        """A shard's whole records, in order, in blocks read into one reused
        buffer of at most READ_BYTES: reading, unlike a memory map, leaves no shard pages in the process's
        resident memory, so a pass over a store costs the buffer alone. Each block is valid until the next."""
        size = self.record_dtype.itemsize
        count = shard.stat().st_size // size
        buffer = np.empty(max(1, min(count, READ_BYTES // size)), self.record_dtype)
        with open(shard, "rb", buffering=0) as f:
            for first in range(0, count, len(buffer)):
                block = buffer[: min(len(buffer), count - first)]
                got = f.readinto(memoryview(block).cast("B")) or 0
                yield block[: got // size]
                if got < block.nbytes:  # cut short since its size was taken: what follows is gone
                    return

    def _valid_records(self, shard: Path) -> tuple[np.ndarray, np.ndarray, list[int | None]]:
        """(row index of each whole record, boolean mask of the records that are complete and intact, the
        row each rejected record was written for as far as its bytes tell (`_row_written_for`)): every
        record checked on every read (crc32 runs at over a GB/s, so a paper-size store takes well under a
        second)."""
        rows, oks, lost = [np.zeros(0, np.uint64)], [np.zeros(0, bool)], []
        for records in self._read_records(shard):
            ok = (records["magic"] == self.magic) & (records["row"] < self.num_rows)
            raw = records.view(np.uint8).reshape(len(records), -1)
            for i in np.flatnonzero(ok):
                ok[i] = zlib.crc32(raw[i, self.checked_from :]) == records["crc"][i]
            lost += [self._row_written_for(records[i], raw[i]) for i in np.flatnonzero(~ok)]
            rows.append(records["row"].copy())
            oks.append(ok)
        return np.concatenate(rows), np.concatenate(oks), lost

    def _row_written_for(self, record: np.void, raw: np.ndarray) -> int | None:
        """The row a rejected record was written for, as far as its bytes tell: the row index its crc32
        vouches for, as stored (only the magic was damaged) or with one bit flipped back; else, its magic
        intact, the stored index (the damage lies in the payload or the crc32); else None (unknown). It only
        tells whether that row has been recomputed since: an index damaged in several bits names another
        row, which can end the warning early but never serves the record, and the true row stays pending."""
        row = int(record["row"])
        if self.version >= 2:
            payload = raw[HEADER.itemsize :]
            for candidate in (row, *(row ^ (1 << bit) for bit in range(64))):
                if zlib.crc32(payload, zlib.crc32(candidate.to_bytes(8, "little"))) == record["crc"]:
                    return candidate if candidate < self.num_rows else None
        return row if record["magic"] == self.magic and row < self.num_rows else None

    def _torn_row(self, shard: Path, whole_records: int) -> int | None:
        """The row a torn last record was being written for, when its header was written whole and names a
        row of this store with the store's magic (its crc32 cannot be checked without the payload)."""
        with open(shard, "rb") as f:
            f.seek(whole_records * self.record_dtype.itemsize)
            head = f.read(HEADER.itemsize)
        if len(head) < HEADER.itemsize:
            return None
        header = np.frombuffer(head, HEADER)[0]
        return int(header["row"]) if header["magic"] == self.magic and header["row"] < self.num_rows else None

    def verify(self) -> dict[str, dict[str, int]]:
        """Per shard: intact records, rejected ones (a bad magic, row index or crc32) and the bytes of a
        torn last record (a writer killed mid-write)."""
        return self._index()[4]

    def rejected_not_recomputed(self) -> dict[str, int]:
        """Of the records `verify()` rejects (`rejected`) and the torn last records (`torn`), how many may
        still be missing from the store: those whose row (`_row_written_for`) has been neither completed
        nor failed since, and those whose row cannot be told while any row has not."""
        rows, _, _, _, _, lost = self._index()
        return self._not_recomputed(lost, set(rows.tolist()) | set(self.failures()))

    def _not_recomputed(self, lost: LostRows, settled: set[int]) -> dict[str, int]:
        """`rejected_not_recomputed` of `_index`'s lost records, given the completed and failed rows."""
        every_row = settled.issuperset(range(self.num_rows))
        return {
            kind: sum(not every_row if row is None else row not in settled for by in lost.values() for row in by[kind])
            for kind in ("rejected", "torn")
        }

    def _index(self) -> tuple[np.ndarray, list[Path], np.ndarray, np.ndarray, dict[str, dict[str, int]], LostRows]:
        """(rows, shard files, shard of each row, record of each row, per-shard counts as in `verify`, per
        shard the rows of its rejected and torn records as in `LostRows`), rows sorted, each row's first
        intact record in (shard name, offset) order."""
        shards, rows, shard_ids, record_ids, counts, lost = [], [], [], [], {}, {}
        for shard in self._shards():
            records, ok, rejected_rows = self._valid_records(shard)
            torn_bytes = shard.stat().st_size % self.record_dtype.itemsize
            counts[shard.stem] = {"intact": int(ok.sum()), "rejected": int((~ok).sum()), "torn_bytes": torn_bytes}
            lost[shard.stem] = {
                "rejected": rejected_rows,
                "torn": [self._torn_row(shard, len(records))] if torn_bytes else [],
            }
            found = np.flatnonzero(ok)
            rows.append(records[found].astype(np.int64))
            shard_ids.append(np.full(len(found), len(shards)))
            record_ids.append(found)
            shards.append(shard)
        if not rows:
            empty = np.zeros(0, np.int64)
            return empty, [], empty, empty, counts, lost
        rows_all = np.concatenate(rows)
        # stable sort keeps (shard, offset) order among duplicates; keep the first of each row
        order = np.argsort(rows_all, kind="stable")
        rows_all = rows_all[order]
        first = np.ones(len(rows_all), bool)
        first[1:] = rows_all[1:] != rows_all[:-1]
        keep = order[first]
        shard_of, record_of = np.concatenate(shard_ids)[keep], np.concatenate(record_ids)[keep]
        return rows_all[first], shards, shard_of, record_of, counts, lost

    def completed_rows(self) -> np.ndarray:
        return self._index()[0]

    def require(self, names: Iterable[str]) -> list[str]:
        """`names` as a list, each a record field or a fixed array of this store (else StoreError)."""
        names = list(names)
        for name in names:
            if name not in self.schema and name not in self.fixed_names:
                have = ", ".join([*self.schema, *self.fixed_names])
                raise StoreError(f"{self.path}: no field {name!r} (have: {have})")
        return names

    def iter_chunks(
        self, names: Iterable[str], chunk: int = 4096, skip_failed: bool = True
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Completed rows in row order, `chunk` at a time: (rows, {name: array}); fixed arrays too.
        Memory is bounded by the chunk: records are read (never mapped) through a buffer of at most
        READ_BYTES, and each value is copied once, from that buffer into the chunk's arrays."""
        names = self.require(names)
        rows, shards, shard_ids, record_ids, _, _ = self._index()
        if skip_failed:
            keep = ~np.isin(rows, list(self.failures()))
            rows, shard_ids, record_ids = rows[keep], shard_ids[keep], record_ids[keep]
        fields = [name for name in names if name not in self.fixed_names]
        size = self.record_dtype.itemsize
        buffer = np.empty(max(1, min(chunk, len(rows), READ_BYTES // size)), self.record_dtype)
        with contextlib.ExitStack() as files:
            opened = [files.enter_context(open(shard, "rb", buffering=0)) for shard in shards]
            for start in range(0, len(rows), chunk):
                part = slice(start, start + chunk)
                out = {name: np.asarray(self.fixed(name)[rows[part]]) for name in names if name in self.fixed_names}
                out.update(
                    {name: np.empty((len(rows[part]), *self.schema[name][0]), self.schema[name][1]) for name in fields}
                )
                # runs of consecutive records of one shard, each read with one call
                shard_of, record_of = shard_ids[part], record_ids[part]
                breaks = np.flatnonzero((np.diff(shard_of) != 0) | (np.diff(record_of) != 1)) + 1
                for first, stop in zip(np.r_[0, breaks], np.r_[breaks, len(record_of)]):
                    for at in range(first, stop, len(buffer)):
                        count = min(len(buffer), stop - at)
                        block = buffer[:count]
                        got = os.preadv(
                            opened[shard_of[at]].fileno(), [memoryview(block).cast("B")], int(record_of[at]) * size
                        )
                        if got != block.nbytes:
                            raise StoreError(
                                f"{shards[shard_of[at]]}: shorter than when it was indexed (truncated while read)"
                            )
                        for name in fields:
                            out[name][at : at + count] = block[name]
                yield rows[part], out

    def read(self, names: Iterable[str], skip_failed: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """All completed rows at once: (rows, {name: array})."""
        names = list(names)
        parts = list(self.iter_chunks(names, chunk=max(self.num_rows, 1), skip_failed=skip_failed))
        if not parts:
            return np.zeros(0, np.int64), {n: np.zeros((0, *self._shape_of(n))) for n in names}
        return parts[0]

    def _shape_of(self, name: str) -> tuple[int, ...]:
        return self.schema[name][0] if name in self.schema else self.fixed(name).shape[1:]

    def failures(self) -> dict[int, str]:
        found = {}
        for file in (self.path / "failed").glob("*.json"):
            try:
                found[int(file.stem)] = json.loads(file.read_text())["reason"]
            except (ValueError, KeyError, json.JSONDecodeError):
                raise StoreError(f"{file}: unreadable failure record") from None
        return found

    def _claim_file(self, row: int) -> Path:
        return self.path / "claims" / f"{row}.claim"

    def _tokens(self) -> Path:
        tokens = self.path / "claims" / "tokens"
        tokens.mkdir(exist_ok=True)  # a store made without the folder still takes claims
        return tokens

    def _claim_files(self) -> Iterator[tuple[int, os.stat_result, bytes, dict[str, Any] | None]]:
        """(row, status, bytes, content or None if torn) of every claim file; a file whose name is no row
        of this store (a stray file) is not a claim."""
        for file in (self.path / "claims").glob("*.claim"):
            if not file.stem.isdigit() or int(file.stem) >= self.num_rows:
                continue
            try:
                yield (int(file.stem), *_read_claim(file))
            except FileNotFoundError:
                continue  # released right now

    def _is_stale(self, seen: os.stat_result, info: dict[str, Any] | None) -> bool:
        """Expired, made by a dead process on this host, or torn by a crash (claims are written whole) and
        older than the grace."""
        age = time.time() - seen.st_mtime
        return age > CLAIM_WRITE_GRACE_S if info is None else (age > self.claim_ttl_s or _owner_is_dead(info))

    def claims(self) -> dict[int, dict[str, Any]]:
        """row -> claim (worker, host, pid, since, id, age_s, stale) for rows being trained."""
        found, now = {}, time.time()
        for row, seen, _, info in self._claim_files():
            fields = info if info is not None else {"worker": ""}
            found[row] = {**fields, "age_s": now - seen.st_mtime, "stale": self._is_stale(seen, info)}
        return found

    def _create_claim(self, row: int, body: dict[str, Any]) -> bool:
        """Claim `row` if nobody holds it: the claim is written whole as its token, `claims/tokens/ROW.ID`,
        then hard-linked to `claims/ROW.claim`, which fails if a claim is there; False if one was."""
        token, claim = self._tokens() / f"{row}.{body['id']}", self._claim_file(row)
        try:
            token.write_bytes(json.dumps(body).encode())
            os.link(token, claim)
        except FileExistsError:
            # on NFS a retransmitted link that had succeeded reports EEXIST: the link count tells
            if token.stat().st_nlink == 2:
                return True
            token.unlink()
            return False
        except FileNotFoundError:  # the token was cleared as half-made while this writer stalled
            return False
        except OSError as e:
            token.unlink(missing_ok=True)
            raise StoreError(f"{claim}: cannot write the claim ({e.strerror})") from None
        return True

    def _remove_claim(self, row: int, claim_id: str) -> bool:
        """Remove row's claim if it is still the one with `claim_id`; whether it was removed. Exclusive: the
        remover first renames the claim's token to a name of its own, which only one can do (a second finds
        the token gone and leaves the claim alone); the token and the claim are one file (hard links), so
        while the token is held the claim is the one it names exactly when both are the same file."""
        tokens = self._tokens()
        held = tokens / f"{row}.{claim_id}.held-{_holder_tag()}"
        try:
            os.rename(tokens / f"{row}.{claim_id}", held)
        except FileNotFoundError:
            if not self._steal_token(row, claim_id, held):
                return False  # another writer is removing it (or has)
        try:
            claim = self._claim_file(row)
            try:
                removed = _same_file(claim.stat(), held.stat())
            except FileNotFoundError:
                return False
            if removed:
                claim.unlink()
            return removed
        finally:
            held.unlink(missing_ok=True)

    def _steal_token(self, row: int, claim_id: str, held: Path) -> bool:
        """Take a claim's token from a remover that died holding it (a dead process on this host, or held for
        longer than the grace elsewhere): renaming that holder's name, which only one can do."""
        for left in self._tokens().glob(f"{row}.{claim_id}.held-*"):
            host, pid, _ = left.name.split(".held-", 1)[1].rsplit("-", 2)
            try:
                age = time.time() - left.stat().st_ctime  # a rename sets the ctime
            except FileNotFoundError:
                continue
            if _process_is_dead(host, pid) if host == socket.gethostname() else age > CLAIM_WRITE_GRACE_S:
                try:
                    os.rename(left, held)
                except FileNotFoundError:
                    continue
                return True
        return False

    def _remove_unmarked_claim(self, row: int, seen: os.stat_result, raw: bytes) -> bool:
        """Remove row's claim if it is still `seen` holding `raw`, for a claim without an id (made by an
        earlier version, or torn) and so without a token: the remover links the claim itself to
        `tokens/ROW.inoINODE`, which only one can do while that name exists, and checks that it linked the
        claim it saw (a remover that links after the first has finished links the claim made since, which
        has an id). A name left by a remover that died is cleared after the grace."""
        claim, token = self._claim_file(row), self._tokens() / f"{row}.ino{seen.st_ino}"
        try:
            os.link(claim, token)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - token.stat().st_ctime > CLAIM_WRITE_GRACE_S:
                    token.unlink()
            return False
        except FileNotFoundError:
            return False
        try:
            removed = _same_file(token.stat(), seen) and token.read_bytes() == raw
            if removed:
                claim.unlink()
            return removed
        finally:
            token.unlink(missing_ok=True)

    def _remove_seen(self, row: int, seen: os.stat_result, raw: bytes, info: dict[str, Any] | None) -> bool:
        claim_id = _claim_id(info)
        return self._remove_claim(row, claim_id) if claim_id else self._remove_unmarked_claim(row, seen, raw)

    def _tidy_claims(self, settled: set[int]) -> None:
        """Clear what killed writers leave in claims/: claims on rows completed or failed since, and tokens
        and temporary files older than the grace that belong to no claim (a claim and its token are one
        file, so a token whose claim is gone has a link count of 1)."""
        for row, seen, raw, info in self._claim_files():
            if row in settled:
                self._remove_seen(row, seen, raw, info)
        now = time.time()
        left = [*self._tokens().iterdir(), *(self.path / "claims").glob(".*.claim.tmp-*")]
        for file in left:
            with contextlib.suppress(FileNotFoundError):
                status = file.stat()
                if status.st_nlink == 1 and now - status.st_ctime > CLAIM_WRITE_GRACE_S:
                    file.unlink()

    def status(self) -> dict[str, Any]:
        """Counts of completed, claimed (live claims), pending and failed rows, failure reasons,
        `duplicates`: intact records beyond the first of their row (a row trained twice; readers keep one),
        `rejected`: records that failed their checks, and torn last records, whose rows have not been
        recomputed since (`rejected_not_recomputed`; `verify()` lists them all), and `workers`: per writer,
        the rows it has written and the live claims it holds."""
        failures = self.failures()
        failed = set(failures)
        rows, _, _, _, counts, lost = self._index()
        completed = set(rows.tolist()) - failed
        live = {r: c["worker"] for r, c in self.claims().items() if not c["stale"] and r not in completed | failed}
        written = {name: shard["intact"] for name, shard in counts.items()}
        holding = Counter(live.values())
        workers = {
            name: {"written": written.get(name, 0), "claimed": holding.get(name, 0)}
            for name in sorted(set(written) | set(holding))
        }
        return {
            "rows": self.num_rows,
            "completed": len(completed),
            "claimed": len(live),
            "failed": len(failed),
            "pending": self.num_rows - len(completed | failed | set(live)),
            "duplicates": sum(written.values()) - len(rows),
            "rejected": sum(self._not_recomputed(lost, completed | failed).values()),
            "workers": workers,
            "failure_reasons": dict(Counter(failures.values()).most_common()),
        }

    def release_claims(self, worker_prefix: str) -> int:
        """Drop the claims of every writer whose name starts with `worker_prefix`, for a caller that knows
        they have all ended (e.g. every task of a finished job array, on whatever hosts they ran, where
        their claims would otherwise only expire after `claim_ttl_s`); returns how many."""
        return sum(
            self._remove_seen(row, seen, raw, info)
            for row, seen, raw, info in self._claim_files()
            if (info or {}).get("worker", "").startswith(worker_prefix)
        )

    def writer(self, worker: str | None = None) -> StoreWriter:
        return StoreWriter(self, worker)


class StorePool:
    """Several stores of one experiment read as one (`open_stores`), as the reference pools its summary
    folders: rows are numbered store after store, so row r of the second store is pooled row
    `len(first) + r`. Reading only; each store is written by its own workers."""

    def __init__(self, stores: list[ResultStore]):
        first, seen = stores[0], {}
        for store in stores:
            if store.path.resolve() in seen:
                raise StoreError(
                    f"{store.path}: given twice (as {seen[store.path.resolve()]}): its rows would count twice"
                )
            seen[store.path.resolve()] = store.path
        for store in stores[1:]:
            if store.schema != first.schema or sorted(store.fixed_names) != sorted(first.fixed_names):
                raise StoreError(f"{store.path}: its fields differ from those of {first.path}: not one experiment")
            for name in first.fixed_names:
                mine, theirs = store.fixed(name), first.fixed(name)
                if mine.shape[1:] != theirs.shape[1:] or mine.dtype != theirs.dtype:
                    raise StoreError(
                        f"{store.path}: fixed array {name!r} holds {mine.dtype} rows of shape {mine.shape[1:]}, "
                        f"{first.path}'s {theirs.dtype} {theirs.shape[1:]}: not one experiment"
                    )
        self.stores, self.path = stores, first.path
        self.schema, self.fixed_names = first.schema, first.fixed_names
        self.offsets = np.cumsum([0] + [store.num_rows for store in stores])
        self.num_rows = int(self.offsets[-1])

    def require(self, names: Iterable[str]) -> list[str]:
        return self.stores[0].require(names)

    def fixed(self, name: str) -> np.ndarray:
        return np.concatenate([store.fixed(name) for store in self.stores])

    def completed_rows(self) -> np.ndarray:
        return np.concatenate([store.completed_rows() + offset for store, offset in zip(self.stores, self.offsets)])

    def failures(self) -> dict[int, str]:
        return {
            int(row + offset): reason
            for store, offset in zip(self.stores, self.offsets)
            for row, reason in store.failures().items()
        }

    def iter_chunks(
        self, names: Iterable[str], chunk: int = 4096, skip_failed: bool = True
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        names = self.require(names)
        for store, offset in zip(self.stores, self.offsets):
            for rows, values in store.iter_chunks(names, chunk, skip_failed):
                yield rows + offset, values

    def read(self, names: Iterable[str], skip_failed: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        names = self.require(names)
        rows, values = [], []
        for store, offset in zip(self.stores, self.offsets):
            part, found = store.read(names, skip_failed)
            rows.append(part + offset)
            values.append(found)
        return np.concatenate(rows), {name: np.concatenate([found[name] for found in values]) for name in names}


def open_stores(paths: str | Path | Iterable[str | Path]) -> ResultStore | StorePool:
    """One store, or several read as one (`StorePool`)."""
    if isinstance(paths, (str, Path)):
        return ResultStore(paths)
    stores = [ResultStore(path) for path in paths]
    if not stores:
        raise StoreError("no store given")
    return stores[0] if len(stores) == 1 else StorePool(stores)


class StoreWriter:
    """One writer process's handle: claims rows, appends completed rows to its own shard."""

    def __init__(self, store: ResultStore, worker: str | None = None):
        self.store = store
        self.worker = worker or worker_name()
        self.shard_path = store.path / "shards" / f"{self.worker}.rows"
        self._shard: Any = None
        self._claim_ids: dict[int, str] = {}  # row -> id of this writer's claim on it

    @property
    def held(self) -> set[int]:
        """The rows this writer holds claims on."""
        return set(self._claim_ids)

    def _claim_body(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": _now(),
            "id": uuid.uuid4().hex[:16],
        }

    def claim(self, count: int = 1, rows: Iterable[int] | None = None) -> list[int]:
        """Claim up to `count` pending rows (from `rows`, default all) in row order. A row that another
        writer completed (and released) between this writer's look at the store and its claim is let go
        at once: rows are written before their claims are released, so a second look after claiming sees
        every such row, and no row is trained twice. Finding nothing to claim, it clears what killed writers
        left in claims/ (`ResultStore._tidy_claims`)."""
        store = self.store
        candidates = list(range(store.num_rows) if rows is None else rows)
        claimed: list[int] = []
        done = set(store.completed_rows().tolist()) | set(store.failures())
        while len(claimed) < count:
            taken = []
            for row in candidates:
                if len(claimed) + len(taken) == count:
                    break
                if row not in done and row not in self._claim_ids and self._try_claim(int(row)):
                    taken.append(int(row))
            if not taken:
                break
            done = set(store.completed_rows().tolist()) | set(store.failures())  # the second look
            for row in done.intersection(taken):
                self.release(row)
            claimed += [row for row in taken if row not in done]
        if not claimed:
            store._tidy_claims(done)
        return claimed

    def _try_claim(self, row: int) -> bool:
        """Create row's claim, or take over a stale one: remove it exclusively (`ResultStore._remove_claim`),
        then create this writer's as if none had been there, which another writer may win."""
        store, body = self.store, self._claim_body()
        if not store._create_claim(row, body):
            try:
                seen, raw, info = _read_claim(store._claim_file(row))
            except FileNotFoundError:
                return False  # just released: leave it to the next round
            if not store._is_stale(seen, info) or not store._remove_seen(row, seen, raw, info):
                return False
            if not store._create_claim(row, body):
                return False
        self._claim_ids[row] = body["id"]
        return True

    def heartbeat(self) -> None:
        """Refresh this writer's claims so that they do not expire while it is still working: through their
        tokens, so a claim another writer has taken over since is left as it is."""
        tokens = self.store._tokens()
        for row, claim_id in self._claim_ids.items():
            with contextlib.suppress(FileNotFoundError):
                os.utime(tokens / f"{row}.{claim_id}")

    def release(self, row: int) -> None:
        """Drop this writer's claim on `row`, if it holds one; another writer's claim is never touched."""
        claim_id = self._claim_ids.pop(row, None)
        if claim_id is not None:
            self.store._remove_claim(row, claim_id)

    def write(self, row: int, **values: Any) -> None:
        """Append row's values (every schema field) durably; then the row counts as complete."""
        self.write_many([row], **{name: np.asarray(value)[None] for name, value in values.items()})

    def write_many(self, rows: Iterable[int], **values: Any) -> None:
        """Append several rows at once (values stacked along a first axis) with a single fsync."""
        store = self.store
        rows = np.asarray(list(rows), dtype=np.int64)
        bad = rows[(rows < 0) | (rows >= store.num_rows)]
        if len(bad):
            raise StoreError(f"{store.path}: row {bad[0]} outside 0..{store.num_rows - 1}")
        missing, extra = set(store.schema) - set(values), set(values) - set(store.schema)
        if missing or extra:
            raise StoreError(
                f"{store.path}: rows {rows[:5].tolist()} fields mismatch (missing {sorted(missing)}, "
                f"unknown {sorted(extra)})"
            )
        records = np.zeros(len(rows), store.record_dtype)
        for name, (shape, dtype) in store.schema.items():
            value = np.asarray(values[name])
            if value.shape != (len(rows), *shape):
                raise StoreError(
                    f"{store.path}: field {name!r} of rows {rows[:5].tolist()} has shape "
                    f"{value.shape[1:]}, expected {shape}"
                )
            if not np.can_cast(value.dtype, dtype, casting="same_kind"):
                raise StoreError(f"{store.path}: field {name!r} is {value.dtype}, expected {dtype}")
            records[name] = value
        records["magic"], records["row"] = store.magic, rows
        raw = records.view(np.uint8).reshape(len(rows), -1)
        records["crc"] = [zlib.crc32(raw[i, store.checked_from :]) for i in range(len(rows))]
        try:
            self._append(records.tobytes())
        except OSError as e:
            raise StoreError(
                f"{self.shard_path}: rows {rows[:5].tolist()} not written ({e.strerror or e}); they are pending again"
            ) from None
        finally:
            for row in rows:
                self.release(int(row))

    def _append(self, data: bytes) -> None:
        """Append whole records durably, or raise OSError with the shard cut back to its last whole record,
        so that an error (a full disk: ENOSPC, or EDQUOT; on NFS it may surface only at the fsync) leaves no
        torn record behind and the next write starts on a record boundary."""
        if self._shard is None:
            self._shard = open(self.shard_path, "ab", buffering=0)
        fd, size = self._shard.fileno(), self.store.record_dtype.itemsize
        end = os.fstat(fd).st_size
        whole = end - end % size
        try:
            if whole != end:  # a tail torn by a write of this writer whose cut failed: nobody else writes here
                os.ftruncate(fd, whole)
            todo = memoryview(data)
            while todo:  # a short write is continued; when the disk is full, the next write says so
                written = os.write(fd, todo)
                if not written:
                    raise OSError(errno.EIO, "a write wrote nothing")
                todo = todo[written:]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # should the cut fail too, the next write makes it
                os.ftruncate(fd, whole)
                os.fsync(fd)
            raise

    def fail(self, row: int, reason: str) -> None:
        """Mark a row failed (e.g. diverged); failed rows are not claimed again and are skipped by readers."""
        file = self.store.path / "failed" / f"{row}.json"
        body = json.dumps({"reason": reason, "worker": self.worker, "time": _now()}).encode()
        try:
            atomic_write(file, body)
        except OSError as e:
            raise StoreError(f"{file}: not written ({e.strerror or e}); row {row} is pending again") from None
        finally:
            self.release(row)

    def close(self) -> None:
        for row in list(self.held):
            self.release(row)
        if self._shard is not None:
            self._shard.close()
            self._shard = None


def format_status(status: dict[str, Any], path: str | Path, max_workers: int = 20) -> str:
    """The counts, failure reasons, then the workers: those holding claims first, then by rows written."""
    lines = [
        f"store {path}: {status['rows']} rows",
        f"  completed {status['completed']:>8}",
        f"  claimed   {status['claimed']:>8}",
        f"  pending   {status['pending']:>8}",
        f"  failed    {status['failed']:>8}",
    ]
    if status["duplicates"]:
        lines.append(f"  duplicate records {status['duplicates']} (rows trained twice; readers keep the first)")
    if status.get("rejected"):
        lines.append(
            f"  rejected records {status['rejected']} (torn or corrupt: their rows are pending again; "
            "`ffcv-transfer store verify` lists them by shard)"
        )
    for reason, count in status["failure_reasons"].items():
        lines.append(f"    {count:>6} x {reason}")
    workers = sorted(status["workers"].items(), key=lambda item: (-item[1]["claimed"], -item[1]["written"], item[0]))
    if workers:
        active = sum(1 for _, counts in workers if counts["claimed"])
        lines.append(f"  workers {len(workers)} ({active} holding claims): claimed / written rows")
        width = max(len(name) for name, _ in workers[:max_workers])
        lines += [
            f"    {name:<{width}} {counts['claimed']:>6} {counts['written']:>8}"
            for name, counts in workers[:max_workers]
        ]
        if len(workers) > max_workers:
            rest = [counts for _, counts in workers[max_workers:]]
            lines.append(
                f"    ... {len(rest)} more: {sum(c['claimed'] for c in rest)} claimed, "
                f"{sum(c['written'] for c in rest)} written"
            )
    return "\n".join(lines)
