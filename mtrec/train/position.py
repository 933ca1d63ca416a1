"""Where a job is within its data: which good rows of which files have been trained.

Every training row carries two position columns, added by the reader (`mtrec.train.stream`):
`_file` (the file's index in the job's file list) and `_row` (the row's ordinal among that file's
good rows). A job of several passes (`train.epochs`) numbers each pass's files on: epoch e's file
i is `e x files + i` (`mtrec.train.stream.job_reads`), so a row is trained once per epoch and a
resumed job continues in the right epoch at the right row; epoch 0's positions are those of a
1-pass job. A rank records the rows it trained as closed intervals per file. At an intra-day
checkpoint the ranks' intervals are merged and saved with the weights; a resumed job drops every
row already inside them, whatever the world size or the split of the stream. Merging refuses an
overlap (a row trained twice), and the final check compares the merged total with the rows the
validation counted, so a published checkpoint has trained every good row exactly once.

Example:
    >>> p = Position()
    >>> p.add_batch(np.array([0, 0, 0]), np.array([0, 1, 2]))
    >>> p.add_batch(np.array([0, 1]), np.array([3, 0]))
    >>> p.intervals, p.rows
    ({0: [[0, 3]], 1: [[0, 0]]}, 5)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mtrec.errors import MtrecError

FILE_COL = "_file"
ROW_COL = "_row"


class Position:
    """Trained rows as sorted, disjoint, merged closed intervals per file index, kept as numpy
    arrays: a shuffled stream trains rows out of order, and up to a shuffle buffer's worth of
    holes stay open at a time, so adding a batch is vectorized (O(intervals + batch))."""

    def __init__(self, intervals: dict[int, list[list[int]]] | None = None):
        self._lo: dict[int, np.ndarray] = {}
        self._hi: dict[int, np.ndarray] = {}
        for f, ivs in (intervals or {}).items():
            if ivs:
                a = np.asarray(ivs, dtype=np.int64).reshape(-1, 2)
                self._insert(int(f), a[:, 0], a[:, 1])

    @property
    def intervals(self) -> dict[int, list[list[int]]]:
        return {f: np.stack([self._lo[f], self._hi[f]], axis=1).tolist() for f in sorted(self._lo)}

    @property
    def empty(self) -> bool:
        """No row recorded (cheaper than building `intervals`)."""
        return not self._lo

    @property
    def rows(self) -> int:
        return int(sum((self._hi[f] - self._lo[f] + 1).sum() for f in self._lo))

    def _insert(self, f: int, lo: np.ndarray, hi: np.ndarray) -> None:
        """Record closed intervals lo..hi of file f. Raises MtrecError if any row is in another
        new interval or was recorded before."""
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order].astype(np.int64), hi[order].astype(np.int64)
        olo, ohi = self._lo.get(f, np.zeros(0, np.int64)), self._hi.get(f, np.zeros(0, np.int64))
        clash = None
        if len(lo) > 1:  # among the new ones
            reach = np.maximum.accumulate(hi)[:-1]
            i = np.flatnonzero(lo[1:] <= reach)
            if len(i):
                clash = (int(lo[i[0] + 1]), int(min(hi[i[0] + 1], reach[i[0]])))
        if clash is None and len(olo):  # against the recorded ones
            k = np.searchsorted(olo, lo, side="right") - 1  # the recorded interval starting at or before lo
            prev = (k >= 0) & (ohi[np.maximum(k, 0)] >= lo)
            j = np.minimum(k + 1, len(olo) - 1)  # the next one, starting after lo
            nxt = (k + 1 < len(olo)) & (olo[j] <= hi)
            bad = np.flatnonzero(prev | nxt)
            if len(bad):
                b = bad[0]
                e = k[b] if prev[b] else j[b]
                clash = (int(max(lo[b], olo[e])), int(min(hi[b], ohi[e])))
        if clash is not None:
            raise MtrecError(
                f"rows {clash[0]}..{clash[1]} of file {f} would be trained twice; "
                "the job stopped before publishing - rerun it (report this as a bug)"
            )
        lo, hi = np.concatenate([olo, lo]), np.concatenate([ohi, hi])
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], hi[order]
        starts = np.flatnonzero(np.concatenate([[True], lo[1:] > np.maximum.accumulate(hi)[:-1] + 1]))
        self._lo[f], self._hi[f] = lo[starts], np.maximum.reduceat(hi, starts)

    def add(self, f: int, lo: int, hi: int) -> None:
        """Record rows lo..hi (inclusive) of file f. Raises MtrecError if any was recorded before."""
        self._insert(f, np.array([lo]), np.array([hi]))

    def add_batch(self, files: np.ndarray, rows: np.ndarray) -> None:
        """Record a batch's rows (its `_file`, `_row` columns, in any order); runs of consecutive
        rows of one file become one interval."""
        if not len(files):
            return
        order = np.lexsort((rows, files))
        files, rows = files[order], rows[order]
        brk = np.flatnonzero((np.diff(files) != 0) | (np.diff(rows) != 1)) + 1
        starts = np.concatenate([[0], brk])
        ends = np.concatenate([brk, [len(files)]]) - 1
        f_of = files[starts]
        for f in np.unique(f_of).tolist():
            sel = f_of == f
            self._insert(int(f), rows[starts[sel]], rows[ends[sel]])

    def rows_per_epoch(self, files: int, epochs: int = 1) -> list[int]:
        """Rows recorded in each pass over a job's `files` files (file index // `files`; 0 files:
        all in epoch 0): `epochs` entries, more if rows of a later epoch were recorded."""
        out = [0] * epochs
        for f in self._lo:
            e = f // files if files > 0 else 0
            out += [0] * (e + 1 - len(out))
            out[e] += int((self._hi[f] - self._lo[f] + 1).sum())
        return out

    def merge(self, other: Position) -> None:
        for f in other._lo:
            self._insert(f, other._lo[f], other._hi[f])

    def trained_mask(self, files: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """True where (file, row) is already inside an interval."""
        done = np.zeros(len(files), dtype=bool)
        for f, lo in self._lo.items():
            sel = files == f
            if not sel.any():
                continue
            r = rows[sel]
            k = np.searchsorted(lo, r, side="right") - 1
            done[sel] = (k >= 0) & (r <= self._hi[f][np.maximum(k, 0)])
        return done

    def to_json(self) -> dict[str, list[list[int]]]:
        return {str(f): ivs for f, ivs in self.intervals.items()}

    @classmethod
    def from_json(cls, data: dict[str, list[list[int]]] | None) -> Position:
        return cls({int(f): ivs for f, ivs in (data or {}).items()})


def batch_positions(rb: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
    """The (file, row) columns of a batch, or None when the batch carries no position."""
    if FILE_COL not in rb.schema.names:
        return None
    return (
        rb.column(FILE_COL).to_numpy(zero_copy_only=False).astype(np.int64),
        rb.column(ROW_COL).to_numpy(zero_copy_only=False).astype(np.int64),
    )


def skip_trained(batches, done: Position):
    """Drop the rows `done` already holds (a resumed job, or a restarted worker whose stream starts
    over); batches with nothing left are skipped. Without intervals, batches pass unchanged."""
    for rb in batches:
        pos = None if done.empty else batch_positions(rb)
        if pos is None:
            yield rb
            continue
        mask = done.trained_mask(*pos)
        if not mask.any():
            yield rb
        elif not mask.all():
            yield rb.filter(pa.array(~mask)) if isinstance(rb, pa.RecordBatch) else pc.filter(rb, pa.array(~mask))
