"""Where a job is within its data: which good rows of which files have been trained.

Every training row carries two position columns, added by the reader (`mtrec.train.stream`):
`_file` (the file's index in the job's file list) and `_row` (the row's ordinal among that file's
good rows). A rank records the rows it trained as closed intervals per file. At an intra-day
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
    """Trained rows as sorted, disjoint, merged closed intervals per file index."""

    def __init__(self, intervals: dict[int, list[list[int]]] | None = None):
        self.intervals: dict[int, list[list[int]]] = {}
        for f, ivs in (intervals or {}).items():
            for lo, hi in ivs:
                self.add(int(f), int(lo), int(hi))

    @property
    def rows(self) -> int:
        return sum(hi - lo + 1 for ivs in self.intervals.values() for lo, hi in ivs)

    def add(self, f: int, lo: int, hi: int) -> None:
        """Record rows lo..hi (inclusive) of file f. Raises MtrecError if any was recorded before."""
        ivs = self.intervals.setdefault(f, [])
        i = 0
        while i < len(ivs) and ivs[i][1] < lo - 1:
            i += 1
        j = i
        while j < len(ivs) and ivs[j][0] <= hi + 1:
            if ivs[j][0] <= hi and lo <= ivs[j][1]:
                raise MtrecError(
                    f"rows {max(lo, ivs[j][0])}..{min(hi, ivs[j][1])} of file {f} would be trained twice; "
                    "the job stopped before publishing - rerun it (report this as a bug)"
                )
            j += 1
        if i < j:
            lo, hi = min(lo, ivs[i][0]), max(hi, ivs[j - 1][1])
        ivs[i:j] = [[lo, hi]]

    def add_batch(self, files: np.ndarray, rows: np.ndarray) -> None:
        """Record a batch's rows (its `_file`, `_row` columns); runs of consecutive rows of one file
        become one interval."""
        if not len(files):
            return
        brk = np.flatnonzero((np.diff(files) != 0) | (np.diff(rows) != 1)) + 1
        starts = np.concatenate([[0], brk])
        ends = np.concatenate([brk, [len(files)]]) - 1
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            self.add(int(files[s]), int(rows[s]), int(rows[e]))

    def merge(self, other: Position) -> None:
        for f, ivs in other.intervals.items():
            for lo, hi in ivs:
                self.add(f, lo, hi)

    def trained_mask(self, files: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """True where (file, row) is already inside an interval."""
        done = np.zeros(len(files), dtype=bool)
        for f, ivs in self.intervals.items():
            sel = files == f
            if not sel.any():
                continue
            r = rows[sel]
            lo = np.array([iv[0] for iv in ivs])
            hi = np.array([iv[1] for iv in ivs])
            k = np.searchsorted(lo, r, side="right") - 1
            done[sel] = (k >= 0) & (r <= hi[np.maximum(k, 0)])
        return done

    def to_json(self) -> dict[str, list[list[int]]]:
        return {str(f): ivs for f, ivs in sorted(self.intervals.items())}

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
        pos = batch_positions(rb) if done.intervals else None
        if pos is None:
            yield rb
            continue
        mask = done.trained_mask(*pos)
        if not mask.any():
            yield rb
        elif not mask.all():
            yield rb.filter(pa.array(~mask)) if isinstance(rb, pa.RecordBatch) else pc.filter(rb, pa.array(~mask))
