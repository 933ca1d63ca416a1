"""What the jobs pass around, typed: the options of a run, the plan of one training job and the
summary a job returns (what a Ray Train worker is given is `mtrec.train.worker.WorkerJob`).

Everything here holds no live resources; the run protocol (`mtrec.jobs.protocol`) fills and
consumes it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import asdict, dataclass, field

from mtrec.data.io import DataFile, filesystem
from mtrec.data.validate import FileCounts, ValidationReport
from mtrec.log import to_json
from mtrec.train.checkpoint import Manifest
from mtrec.train.position import Position

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """How a training job (train, nightly, backfill) runs: the command line's flags."""

    force: bool = False  # retrain a published day and replace its checkpoint
    cold_start: bool = False  # nightly/backfill: the first day from a fresh model
    catch_up: bool = False  # nightly: train missing days before the day first
    allow_config_change: bool = False  # warm-start across changed training settings
    promote: bool = False  # nightly/backfill: run the promotion gate on the new version
    address: str | None = None  # Ray cluster to join (None: RAY_ADDRESS, else a local one)
    log_every: int = 50  # steps between progress lines
    ray_logs: bool = False  # forward the workers' output to this console
    summary: str | None = None  # also write the job summary (JSON) here


@dataclass
class JobPlan:
    """One training job, checked and ready to run: what it trains, from where, and where it writes."""

    kind: str  # full_retrain | nightly
    days: list[dt.date]
    parent: str | None  # the checkpoint it warm-starts from (None: a fresh model)
    files: list[DataFile]  # every file of `days`, in training order (epoch 0's)
    job_id: str  # same data, parent and settings -> same id: a rerun resumes the intra-day checkpoint
    done: Position  # rows an earlier run of this job already trained (its newest intra-day checkpoint)
    staged: str  # where the checkpoint is staged before publishing
    checkpoint: str  # where it is published (dt=<last day>)
    manifest: Manifest = field(default_factory=Manifest)  # the entries known before training
    started: float = field(default_factory=time.time)  # when planning began: the job's wall time includes it
    init_from: str | None = None  # a cold start's initial weights: another model's checkpoint (`train.init_from`)
    epochs: int = 1  # passes over the good rows: `train.epochs` for a full retrain, 1 for a nightly day
    reads: list[int] = field(default_factory=list)  # every file read, in order (`stream.job_reads`); []: files once
    file_days: list[dt.date] = field(default_factory=list)  # per file of `files`, its day
    # per file index, what the contract found in it: from the training read (filled after training), or
    # already known to a resumed job from its intra-day checkpoint
    counts: dict[int, FileCounts] = field(default_factory=dict)
    reports: list[ValidationReport] = field(default_factory=list)  # per day, from `counts` after training

    @property
    def end(self) -> dt.date:
        return self.days[-1]

    @property
    def run(self) -> str:
        """This run's id, also in its intra-day checkpoints' names."""
        return self.staged.rsplit(".", 1)[-1]

    @property
    def expected_rows(self) -> int | None:
        """Good rows of `days`, the rows each epoch trains, once every file's counts are known
        (None before)."""
        if len(self.counts) < len(self.files):
            return None
        return sum(c.good for c in self.counts.values())

    def quarantine(self, workdir: str) -> list[str]:
        """Per file of `files`, its day's quarantine folder."""
        from mtrec.data.validate import quarantine_url

        return [quarantine_url(workdir, d) for d in self.file_days]


@dataclass
class TrainSummary:
    """What a training job did. `rows == epochs x expected_rows` (each epoch trained every good row
    once) is checked before the job succeeds."""

    model: str
    days: list[str]
    world_size: int
    kind: str = "full_retrain"  # full_retrain | nightly
    parent: str | None = None  # the checkpoint it warm-started from (None: cold start)
    resumed: dict | None = None  # {"checkpoint", "step", "rows"} when it resumed an intra-day checkpoint
    restarts: int = 0  # worker-group restarts within the job (each resumed from an intra-day checkpoint)
    skipped: bool = False  # the day was already published: nothing done
    phases: dict = field(default_factory=dict)  # milestone -> seconds since the job started (where the wall time goes)
    input_rows: int = 0
    quarantined_rows: int = 0
    truncated: dict = field(default_factory=dict)  # sequence group -> good rows whose lists were cut to max_len
    expected_rows: int = 0  # good rows the validation counted
    epochs: int = 1  # passes over them (`train.epochs`, full retrains only)
    rows: int = 0  # rows the workers trained, summed
    rows_per_s: float = 0.0  # streaming rate: rows / slowest worker's first-to-last-batch time
    wall_s: float = 0.0
    workers: list[dict] = field(default_factory=list)  # per rank: WorkerStats + node/pid/threads
    plan: dict = field(default_factory=dict)  # table -> {sharding_type, ranks}
    progress: list[dict] = field(default_factory=list)  # rank 0's progress records
    ray: dict = field(default_factory=dict)
    checkpoint: str = ""  # the published checkpoint (dt=<last day>)
    # {"uri", "run_id", "version", "model_uri", "eval_day", "metrics"} (tracking on)
    mlflow: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return to_json(asdict(self))  # strict: a diverged loss is null, not NaN

    def lines(self) -> list[str]:
        per = ", ".join(
            f"worker {w['rank']}: {w['rows']:,} rows at {w['rows_per_s']:,.0f}/s "
            f"({w['wait_s']:.1f}s waiting for data, {w['convert_s']:.1f}s converting)"
            for w in self.workers
        )
        tables: dict[int, int] = {}
        for t in self.plan.values():
            for r in t["ranks"]:
                tables[r] = tables.get(r, 0) + 1
        loss = [p["loss"] for p in self.progress]
        start = (
            (f"warm start from {self.parent}" if self.parent else "cold start")
            + (
                f", resumed at step {self.resumed['step']} ({self.resumed['rows']:,} rows already trained)"
                if self.resumed
                else ""
            )
            + (f", {self.restarts} worker restart(s)" if self.restarts else "")
        )
        return [
            f"trained {self.rows:,} rows"
            + (f" ({self.epochs} epochs of {self.expected_rows:,})" if self.epochs > 1 else "")
            + f" of {self.days[0]} .. {self.days[-1]} on {self.world_size} worker(s) "
            f"({self.quarantined_rows:,} quarantined): {self.rows_per_s:,.0f} rows/s streaming, "
            f"{self.wall_s:.1f}s wall",
            f"  {self.kind}: {start}",
            *(
                [
                    f"  sampling: {sum(w.get('sampled_rows', 0) for w in self.workers):,} rows trained after sampling "
                    f"(negative_rate / positive_repeat in train.sampling)"
                ]
                if any(w.get("sampled_rows", w["rows"]) != w["rows"] for w in self.workers)
                else []
            ),
            *(
                [f"  sequences truncated to max_len: {', '.join(f'{g} {n:,} rows' for g, n in self.truncated.items())}"]
                if any(self.truncated.values())
                else []
            ),
            f"  {per}",
            f"  embedding shards per worker: {', '.join(f'worker {r}: {n} tables' for r, n in sorted(tables.items()))}",
            f"  loss {loss[0]:.4f} -> {loss[-1]:.4f}" if loss else "  loss: no batches",
            f"  checkpoint: {self.checkpoint}",
            *(
                [
                    f"  mlflow: run {self.mlflow['run_id']}, version {self.mlflow.get('version')} (alias challenger) "
                    f"in {self.mlflow['uri']}"
                    + (
                        f"; on {self.mlflow['eval_day']}: "
                        + ", ".join(
                            f"{k} {v:.4f}" for k, v in self.mlflow["metrics"].items() if k in self.mlflow["gate"]
                        )
                        if self.mlflow.get("eval_day")
                        else "; no next-day logs to evaluate on yet"
                    )
                ]
                if self.mlflow.get("run_id")
                else []
            ),
            "  timeline (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()),
        ]


def write_summary(summary: TrainSummary | list[TrainSummary], url: str) -> None:
    """The job summary as JSON (a list for a multi-day nightly/backfill)."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as fh:
        fh.write(summary.to_json() if isinstance(summary, TrainSummary) else to_json([asdict(s) for s in summary]))


def report(summaries: list[TrainSummary], path: str | None) -> None:
    """Each trained day's summary lines (progress log), and the summaries as JSON at `path`."""
    for s in summaries:
        if not s.skipped:
            for line in s.lines():
                log.info(line)
    if path:
        write_summary(summaries[0] if len(summaries) == 1 else summaries, path)
        log.info("summary: %s", path)
