"""Training-time sampling: negative down-sampling and positive over-sampling, deterministic per row.

Ranking teams train on filtered, re-balanced logs: most non-clicks dropped (`negative_rate`),
clicks repeated (`positive_repeat`). Whether a negative row is kept depends only on the seed and
its position (file index, row ordinal), so a resumed or re-run job samples exactly the same rows,
whatever the batch boundaries or the number of workers. The rows left out are still *consumed*:
the exactly-once accounting (mtrec.train.position) counts them as done.

The model's scores are corrected back to the unsampled space at scoring (mtrec.models.base), so
only the training distribution changes. That is what shifts BatchNorm's running statistics away
from what serving sees (mtrec.bn). Sampling on a label skews every other root task too (a
regression task such as watch time would learn the sampled mean), which cannot be corrected, so
the config refuses sampling when another root task exists.

Example:
    >>> kept = sample(record_batch, cfg.train.sampling, seed=0)   # fewer negatives, repeated positives
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from mtrec.config import SamplingConfig
from mtrec.data.hashing import splitmix64
from mtrec.train.position import FILE_COL, ROW_COL


def uniform(seed: int, files: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A number in [0, 1) per (seed, file, row): splitmix64 of the three, reproducible anywhere."""
    z = np.full(len(rows), np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    for v in (files.astype(np.int64).view(np.uint64), rows.astype(np.int64).view(np.uint64)):
        z = splitmix64(z ^ v)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def sample(rb: pa.RecordBatch, cfg: SamplingConfig, seed: int) -> pa.RecordBatch:
    """The rows of `rb` to train on: each negative kept with probability `negative_rate`, each
    positive `positive_repeat` times (in place, so a batch keeps its order). `rb` must carry
    positions (`_file`, `_row`) when negatives are down-sampled."""
    if cfg.negative_rate >= 1 and cfg.positive_repeat == 1:
        return rb
    label = rb.column(cfg.label).to_numpy(zero_copy_only=False) > 0
    times = np.where(label, cfg.positive_repeat, 1)
    if cfg.negative_rate < 1:
        u = uniform(
            seed, rb.column(FILE_COL).to_numpy(zero_copy_only=False), rb.column(ROW_COL).to_numpy(zero_copy_only=False)
        )
        times = np.where(~label & (u >= cfg.negative_rate), 0, times)
    return rb.take(pa.array(np.repeat(np.arange(rb.num_rows), times)))
