"""`mtrec tune`: a hyperparameter search over any config key, on Ray Tune, each trial real mtrec jobs.

    space file (`SearchSpace`) -> every value checked against the base config before Ray starts
    -> Ray Tune: `trials` samples of the space (seeded), one at a time by default, ASHA stops the
       bad ones early; a trial is a Tune function (`_trial`) whose step i trains day i of
       --from .. --to in the trial's own workdir: day 1 as `mtrec train` (`run_train`), each later
       day as a warm-started `mtrec nightly` (`run_nightly`), each a Ray Train job (DMP,
       exactly once, checkpointed, published), then scores the day's checkpoint on the eval days
       (after --to, trained on by no trial) and reports the metric
    -> MLflow (the driver only, `_TrialRuns`): one parent run per search in experiment
       `<model>-tune`, one child run per trial (its overrides as params, its metric per day)
    -> the best trial's overrides applied to the base config file: `best.yaml`, a ready config,
       written to the search's folder (and --out) and logged on the parent run

Where things live, under `<workdir>/tune/<name>/` (a local path or any fsspec URL):

    experiment_state-*.json, tuner.pkl, <trial id>/   Ray Tune's own state (what `Tuner.restore` reads)
    search.json                                      the search's arguments and its MLflow parent run
    trials/<trial id>/                               each trial's mtrec workdir: checkpoints dt=D/, eval/
    best.yaml                                        the result

Resume: rerunning the same command (same --name) restores Tune's state; a trial continues after
the last day it reported (a Tune checkpoint holds the count), and a day its workdir already
published is not trained again (`run_train` / `run_nightly` are idempotent): the published
checkpoints are the truth. The MLflow parent run is reused (its id is in search.json).

Example:
    >>> space = load_space("tune_esmm")                     # doctest: +SKIP
    >>> run_tune(load_config("esmm"), space, date(2026, 1, 1), date(2026, 1, 4))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import io
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from mtrec.config import GATE_METRICS, MtrecConfig, parse_config, read_config_dict, set_key
from mtrec.configdoc import validate
from mtrec.data.io import filesystem, is_local, join, local_path
from mtrec.errors import ConfigError, DataValidationError, MtrecError, first_line
from mtrec.log import configure, to_json, verbose
from mtrec.spec import LabelKind, Strict

log = logging.getLogger(__name__)

SPACE_EXAMPLES = ("tune_esmm",)
TRIAL_CPUS = 0.01  # a trial's own actor only waits on its Ray Train jobs: the workers reserve the CPUs
EXPERIMENT_SUFFIX = "-tune"  # MLflow experiment of the searches: `<model>-tune`, beside the jobs' `<model>`
OBJECTIVE = "objective"  # what trials report to Tune: the space's `metric` (Tune splits keys at "/")
# keys a search may not change: tune sets each trial's paths and tracking, and these train nothing
FIXED_KEYS = ("job", "tracking", "gate", "bn", "name")
# metric names per kind of output (`mtrec.eval.evaluate`); calibration has no better end (|x - 1|)
METRICS_OF = {
    "root": ("auc", "gauc", "ne", "log_loss", "auc_unbiased"),
    "given": ("auc", "gauc", "ne", "log_loss", "auc_entire_space"),
    "joint": ("auc", "gauc", "ne", "log_loss"),
    LabelKind.REGRESSION: ("mse", "pearson"),
    LabelKind.MULTICLASS: ("accuracy", "macro_auc", "log_loss", "macro_auc_truth"),
}
TRUTH_METRICS = ("auc_unbiased", "auc_entire_space", "macro_auc_truth")  # need the synthetic world's truth


# --------------------------------------------------------------------------------------------------
# the search space file


class Mode(StrEnum):
    MAX = "max"
    MIN = "min"


class SchedulerName(StrEnum):
    ASHA = "asha"
    NONE = "none"


class Dist(StrEnum):
    CHOICE = "choice"  # [v1, v2, ...]: any YAML values (numbers, strings, lists such as tower sizes)
    UNIFORM = "uniform"  # [lo, hi]
    LOGUNIFORM = "loguniform"  # [lo, hi], 0 < lo
    RANDINT = "randint"  # [lo, hi]: integers lo .. hi, both included
    QUNIFORM = "quniform"  # [lo, hi, q]: uniform, rounded to a multiple of q


class Distribution(Strict):
    """One key's values: written `{choice: [...]}`, `{loguniform: [lo, hi]}`, ..."""

    kind: Dist
    args: list[Any]

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data: Any) -> Any:
        kinds = ", ".join(f"{{{d.value}: [...]}}" for d in Dist)
        if not isinstance(data, dict) or len(data) != 1:
            raise ValueError(f"got {data!r}; write one distribution: {kinds}")
        ((kind, args),) = data.items()
        if kind not in {d.value for d in Dist}:
            raise ValueError(f"unknown distribution `{kind}`; use one of {kinds}")
        if not isinstance(args, list) or not args:
            raise ValueError(f"`{kind}` takes a non-empty list, got {args!r}")
        return {"kind": kind, "args": args}

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        k, a = self.kind, self.args
        if k == Dist.CHOICE:
            return self
        want = 3 if k == Dist.QUNIFORM else 2
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in a)
        if len(a) != want or not numbers:
            form = "[lo, hi, q]" if k == Dist.QUNIFORM else "[lo, hi]"
            raise ValueError(f"`{k}` takes {form} (numbers), got {a!r}")
        if k == Dist.RANDINT and not all(isinstance(x, int) for x in a):
            raise ValueError(f"`randint` takes two integers [lo, hi], got {a!r}")
        if not a[0] < a[1]:
            raise ValueError(f"`{k}` needs lo < hi, got {a!r}")
        if k == Dist.LOGUNIFORM and a[0] <= 0:
            raise ValueError(f"`loguniform` needs 0 < lo, got {a!r}; use uniform for a range from 0")
        if k == Dist.QUNIFORM and a[2] <= 0:
            raise ValueError(f"`quniform` needs a step q > 0, got {a!r}")
        return self

    def tune_domain(self):
        """The Ray Tune domain (`tune.choice`, ...)."""
        from ray import tune

        a = self.args
        return {
            Dist.CHOICE: lambda: tune.choice(a),
            Dist.UNIFORM: lambda: tune.uniform(a[0], a[1]),
            Dist.LOGUNIFORM: lambda: tune.loguniform(a[0], a[1]),
            Dist.RANDINT: lambda: tune.randint(a[0], a[1] + 1),  # Tune's upper bound is excluded
            Dist.QUNIFORM: lambda: tune.quniform(a[0], a[1], a[2]),
        }[self.kind]()

    def extremes(self) -> list[Any]:
        """The values checked against the config before the search: each choice, or both ends (and
        a point inside a continuous range, so an integer key given `uniform` fails here, not in a trial)."""
        if self.kind == Dist.CHOICE:
            return list(self.args)
        lo, hi = self.args[:2]
        if self.kind == Dist.QUNIFORM:
            q = self.args[2]
            return [math.ceil(lo / q) * q, math.floor(hi / q) * q]
        if self.kind == Dist.UNIFORM:
            return [lo, hi, lo + (hi - lo) * 0.377]  # not a round number: an integer key refuses it
        if self.kind == Dist.LOGUNIFORM:
            return [lo, hi, lo * (hi / lo) ** 0.377]
        return [lo, hi]


class SchedulerConfig(Strict):
    name: SchedulerName = Field(
        SchedulerName.ASHA, description="asha: stop trials below the median of a rung early; none: run every day."
    )
    grace_period: int = Field(1, ge=1, description="Days every trial trains before ASHA may stop it.")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps 1 / reduction_factor of the trials per rung.")


class SearchSpace(Strict):
    """A `mtrec tune --space` file."""

    metric: str = Field(description="`<task>/<metric>` of mtrec's evaluation on the eval days, e.g. ctr/auc.")
    mode: Mode | None = Field(None, description="max or min; default: the metric's better end (auc: max, ne: min).")
    trials: int = Field(8, ge=1, description="Trials (Tune's num_samples).")
    seed: int = Field(0, description="Seed of the search (which values are sampled), not of training.")
    concurrent: int = Field(
        1, ge=1, description="Trials at a time; each trial's Ray Train workers need their CPUs (train.num_workers)."
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="Early stopping.")
    space: dict[str, Distribution] = Field(min_length=1, description="Dotted config key -> distribution.")

    @field_validator("space")
    @classmethod
    def _keys(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        for key in space:
            if key.split(".")[0] in FIXED_KEYS:
                raise ValueError(
                    f"`{key}` cannot be searched: mtrec tune sets each trial's paths and tracking, and "
                    f"{', '.join(FIXED_KEYS)} do not change training; search train.*, model.*, features.*, tasks.*"
                )
        return space

    def direction(self) -> Mode:
        """`mode`, or the metric's better end."""
        return self.mode or (Mode.MAX if GATE_METRICS.get(self.metric.partition("/")[2], 1) > 0 else Mode.MIN)


def space_path(name: str) -> Path:
    """Path of a shipped search space (`SPACE_EXAMPLES`)."""
    return Path(str(resources.files("mtrec.configs").joinpath(f"{name}.yaml")))


def load_space(source: str | Path) -> SearchSpace:
    """Read and validate a search-space file (a path, an fsspec URL or a shipped name: tune_esmm).

    Raises:
        ConfigError: one line naming the file, the key and the fix.
    """
    src = str(source)
    if src in SPACE_EXAMPLES:
        src = str(space_path(src))
    label = Path(src).name
    try:
        fs, path = filesystem(src)
        with fs.open(path, "r") as fh:
            data = yaml.safe_load(fh.read())
    except FileNotFoundError:
        raise ConfigError(
            f"search space `{src}` not found; pass --space PATH or a shipped one: {', '.join(SPACE_EXAMPLES)}"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"search space {label}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"search space {label}: expected a mapping with metric, space, ..., got {data!r}")
    try:
        return validate(SearchSpace, data, label)
    except (
        ConfigError
    ) as e:  # configdoc's wording is the config file's: "config <label>: ... (see docs/configuration.md)"
        msg = str(e).removeprefix("config ").replace("docs/configuration.md", "docs/tuning.md")
        raise ConfigError(f"search space {msg}") from None


def check_search(cfg: MtrecConfig, space: SearchSpace, eval_days: list[dt.date]) -> None:
    """Before Ray starts: the metric is one the evaluation reports for `cfg`'s tasks and `mode`
    agrees with it, and every value of every key of the space gives a valid config.

    Raises:
        ConfigError: one line naming the key or metric and the fix.
    """
    _check_metric(cfg, space, eval_days)
    base = cfg.model_dump(mode="json")
    for key, dist in space.space.items():
        for value in dist.extremes():
            data = copy.deepcopy(base)
            try:
                set_key(data, key, value)
                parse_config(data, "base config")
            except ConfigError as e:
                msg = str(e).removeprefix("config base config: ")
                if "valid integer" in msg:
                    msg += "; draw an integer key with randint, quniform or choice"
                raise ConfigError(f"search space: `{key}: {_short(value)}` makes an invalid config: {msg}") from None


def _check_metric(cfg: MtrecConfig, space: SearchSpace, eval_days: list[dt.date]) -> None:
    task, _, name = space.metric.partition("/")
    spec = cfg.spec
    kinds = {}
    for t in spec.tasks:
        kind = spec.label_kind(t)
        kinds[t.name] = ("given" if t.given else "root") if kind == LabelKind.BINARY else kind
        if t.joint_name:
            kinds[t.joint_name] = "joint"
    if task not in kinds:
        raise ConfigError(
            f"search space: metric `{space.metric}` names no output of {cfg.name}; use `<output>/<metric>` with "
            f"output one of {', '.join(kinds)}, e.g. {next(iter(kinds))}/auc"
        )
    allowed = METRICS_OF[kinds[task]]
    if name not in allowed:
        raise ConfigError(
            f"search space: metric `{space.metric}` is not one the evaluation reports for {task} to rank by; use "
            + ", ".join(f"{task}/{m}" for m in allowed)
        )
    better = Mode.MAX if GATE_METRICS[name] > 0 else Mode.MIN
    if space.mode is not None and space.mode != better:
        raise ConfigError(
            f"search space: `mode: {space.mode}` for {space.metric} would pick the worst trial ({better} is better); "
            f"write `mode: {better}` or leave mode out"
        )
    if name in TRUTH_METRICS:
        from mtrec.eval.evaluate import read_truth

        if any(read_truth(str(cfg.job.logs), d) is None for d in eval_days):
            raise ConfigError(
                f"search space: metric `{space.metric}` needs the synthetic world's truth, which the eval days' logs "
                f"under {cfg.job.logs} do not have; rank by {task}/auc instead"
            )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------------------------------
# one trial (runs in its Tune trial actor, anywhere in the cluster)


@dataclass(frozen=True)
class TrialJob:
    """What every trial is given: the base config, the days it trains and the days it is scored on."""

    base: dict  # the base run spec (resolved: absolute paths), JSON
    days: list[str]  # training days, one per step
    eval_days: list[str]
    root: str  # the search's folder: trials' workdirs under <root>/trials/
    metric: str
    keys: list[str]  # the space's keys in the file's order: overrides are applied in it (Tune sorts them)
    threads: int = 1  # torch threads for scoring (the node's cores / concurrent trials)


def trial_workdir(root: str, trial_id: str) -> str:
    return join(root, "trials", trial_id)


def trial_config(base: dict, overrides: dict[str, Any], workdir: str | None = None) -> MtrecConfig:
    """The base config with a trial's `overrides` (dotted keys) applied; with `workdir`, as the
    trial runs it: its own workdir, tracking off (the search records the trial, not the jobs)."""
    data = copy.deepcopy(base)
    for key, value in overrides.items():
        set_key(data, key, value)
    if workdir is not None:
        data["job"]["workdir"] = workdir
        data["tracking"]["enabled"] = False
    return parse_config(data, "trial config")


def _trial(config: dict, job: TrialJob) -> None:
    """One trial: step i trains day i (idempotent: a published day is not trained again), scores
    the day's checkpoint on the eval days and reports it with a Tune checkpoint holding the count."""
    import tempfile

    from ray import tune

    from mtrec.jobs.nightly import run_nightly
    from mtrec.jobs.plan import RunOptions
    from mtrec.jobs.retrain import run_train

    configure(sys.stderr)  # the jobs' progress: in Ray's log files of the trial (on the console with --ray-logs)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(job.base, {k: config[k] for k in job.keys}, trial_workdir(job.root, trial_id))
    days = [dt.date.fromisoformat(d) for d in job.days]
    done = 0
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            done = json.loads(Path(folder, "trial.json").read_text())["days"]
    opts = RunOptions(log_every=1000)
    for i, day in enumerate(days[done:], done):
        if i == 0:
            run_train(cfg, day, day, opts)
        else:
            run_nightly(cfg, day, opts)
        metrics = _scored(cfg, day, job)
        if job.metric not in metrics:
            raise ConfigError(
                f"metric `{job.metric}` is not among the evaluation's metrics on {', '.join(job.eval_days)} "
                f"({', '.join(sorted(metrics))}); pick one of them in the search space"
            )
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "trial.json").write_text(json.dumps({"days": i + 1, "day": day.isoformat()}))
            tune.report(
                {
                    OBJECTIVE: math.nan if metrics[job.metric] is None else metrics[job.metric],  # ASHA skips NaN
                    "day": day.isoformat(),
                    **{f"eval/{k}": v for k, v in metrics.items()},
                },
                checkpoint=tune.Checkpoint.from_directory(folder),
            )


def _scored(cfg: MtrecConfig, day: dt.date, job: TrialJob) -> dict[str, float]:
    """The metrics of `day`'s published checkpoint on the eval days, kept beside it in the trial's
    workdir (eval/dt=D.json), so a resumed trial does not score a day twice."""
    import torch

    from mtrec.jobs.evaluate import evaluate_checkpoint
    from mtrec.train import checkpoint

    fs, path = filesystem(join(cfg.job.workdir, "eval", f"dt={day}.json"))
    if fs.exists(path):
        with fs.open(path, "r") as fh:
            return json.loads(fh.read())
    torch.set_num_threads(job.threads)  # the trial's actor reserves ~0 CPUs: Ray would pin it to 1 thread
    eval_days = [dt.date.fromisoformat(d) for d in job.eval_days]
    # in the trial's own process: a trial is one Ray task already
    metrics, _, _ = evaluate_checkpoint(cfg.with_train(num_workers=1), eval_days, checkpoint.checkpoint_url(cfg, day))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as fh:
        fh.write(to_json(metrics))
    return json.loads(to_json(metrics))  # NaN -> None, as a resumed trial reads it back


def _trial_dirname(trial) -> str:
    """Tune's folder of a trial: its id (Tune's default puts the sampled values in, `*` included)."""
    return trial.trial_id


# --------------------------------------------------------------------------------------------------
# MLflow: only the driver talks to it (a Tune callback), a child run per trial


class _TrialRuns:
    """A Tune callback (built lazily: `_callback()`) that mirrors each trial into its MLflow child
    run: created when the trial first reports, its params the trial's overrides, each day's metrics
    at step = day index (a step already logged, e.g. re-reported after a resume, is not logged
    twice), ended when the trial ends. Pickled into Tune's state (tuner.pkl): holds plain values."""

    def __init__(self, base: dict, parent_run_id: str, name: str, days: int, metric: str):
        self.base, self.parent, self.name, self.days, self.metric = base, parent_run_id, name, days, metric
        self._tracker = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._logged: dict[str, int] = {}  # trial id -> newest step logged

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tracker": None, "_runs": {}, "_logged": {}}

    @property
    def tracker(self):
        if self._tracker is None:
            self._tracker = search_tracker(parse_config(self.base, "base config"))
        return self._tracker

    def run_of(self, trial) -> str:
        """The trial's child run: found by its tag (a resumed search), else created."""
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        t = self.tracker
        found = t.call(
            "searching the trial's run",
            t.client.search_runs,
            [t.experiment_id()],
            f"tags.`mlflow.parentRunId` = '{self.parent}' and tags.`mtrec.tune.trial_id` = '{tid}'",
        )
        if found:
            run_id = found[0].info.run_id
            history = t.call("reading the trial's metric", t.client.get_metric_history, run_id, self.metric)
            self._logged[tid] = max((m.step for m in history), default=0)
        else:
            overrides = dict(trial.config)
            run = t.call(
                "starting the trial's run",
                t.client.create_run,
                t.experiment_id(),
                run_name=f"{self.name} {tid}",
                tags={
                    "mlflow.parentRunId": self.parent,
                    "mtrec.tune.trial_id": tid,
                    "mtrec.tune.name": self.name,
                    "mtrec.tune.overrides": json.dumps(overrides),
                },
            )
            run_id = run.info.run_id
            # MLflow's param names allow no `*`: features.sparse.*.dim -> features.sparse.all.dim
            t.log_params(run_id, {k.replace("*", "all"): json.dumps(v) for k, v in overrides.items()})
            self._logged[tid] = 0
        self._runs[tid] = run_id
        return run_id

    def on_result(self, trial, result: dict) -> None:
        step = int(result["training_iteration"])
        run_id = self.run_of(trial)
        value = result[OBJECTIVE]
        log.info(
            f"trial {trial.trial_id} day {step}/{self.days} ({result.get('day')}): {self.metric} "
            + (f"{value:.4f}" if value is not None else "n/a")
        )
        if step <= self._logged.get(trial.trial_id, 0):
            return
        metrics = {k.removeprefix("eval/"): v for k, v in result.items() if k.startswith("eval/")}
        self.tracker.log_metrics(run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
        self._logged[trial.trial_id] = step

    def on_end(self, trial, error: BaseException | None) -> None:
        run_id = self.run_of(trial)
        days = int(trial.last_result.get("training_iteration", 0)) if trial.last_result else 0
        tags = {"mtrec.tune.days": str(days), "mtrec.tune.stopped_early": str(error is None and days < self.days)}
        if error is not None:
            tags["mtrec.tune.error"] = _error_line(error)
        self.tracker.set_tags(run_id, tags)
        self.tracker.end_run(run_id, "FAILED" if error is not None else "FINISHED")
        what = f"failed: {tags['mtrec.tune.error']}" if error is not None else f"done after {days} day(s)"
        log.info(
            f"trial {trial.trial_id} {what}"
            + (" (stopped early)" if tags["mtrec.tune.stopped_early"] == "True" else "")
        )


def _callback(runs: _TrialRuns):
    """`runs` as a Ray Tune Callback (ray.tune imported here: importing this module stays light)."""
    from ray.tune import Callback

    class TrialRuns(Callback):
        def __init__(self, runs: _TrialRuns):
            self.runs = runs

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.runs.on_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.runs.on_end(trial, None)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.runs.on_end(trial, _trial_exception(trial))

    return TrialRuns(runs)


def _trial_exception(trial) -> BaseException:
    """A failed trial's exception, from the file Tune has just written in the driver's staging
    folder (its copy in the search's folder comes later)."""
    import pickle

    from ray import cloudpickle

    with (
        contextlib.suppress(OSError, TypeError, EOFError, pickle.UnpicklingError),
        open(trial.pickled_error_file, "rb") as fh,
    ):
        return cloudpickle.load(fh)
    return MtrecError("see the trial's error.txt in the search's folder, or the Ray logs")


def search_tracker(cfg: MtrecConfig):
    """The Tracker of the searches of `cfg`'s model: experiment `<model>-tune`, the model's store."""
    from mtrec.tracking import Tracker

    return Tracker(cfg, experiment=cfg.name + EXPERIMENT_SUFFIX)


def _error_line(err: BaseException) -> str:
    return first_line(_mtrec_cause(err))


# --------------------------------------------------------------------------------------------------
# the search


@dataclass(frozen=True)
class TuneOptions:
    """How `mtrec tune` runs: the command line's flags."""

    name: str | None = None  # the search's folder under <workdir>/tune (default <model>-<from>-<to>)
    eval_days: int = 1  # days after --to every trial is scored on
    out: str | None = None  # also write best.yaml here
    address: str | None = None  # Ray cluster to join (None: RAY_ADDRESS, else a local one)
    ray_logs: bool = False  # forward the workers' output to this console


@dataclass
class TrialSummary:
    """One trial of a search: its values, its metric per day, how it ended."""

    trial_id: str
    overrides: dict
    days: int  # days trained and reported
    value: float | None  # the metric after the last of them
    curve: list[float | None] = field(default_factory=list)  # the metric per day
    stopped_early: bool = False
    error: str | None = None
    run_id: str | None = None


@dataclass
class TuneSummary:
    """What a search found: every trial, the best (of those that trained every day), the worst."""

    name: str
    folder: str  # <workdir>/tune/<name>: Tune's state, search.json, trials/, best.yaml
    metric: str
    mode: str
    days: list[str]  # training days, one per step
    eval_days: list[str]
    parent_run_id: str
    experiment: str
    tracking_uri: str
    trials: list[TrialSummary]  # best first; failed trials last
    best: TrialSummary
    worst: TrialSummary | None
    margin: float | None  # |best - worst|: the metric after each one's last day
    best_config: str  # best.yaml in the search's folder
    out: str | None = None  # and --out
    resumed: bool = False  # a rerun that restored the search
    wall_s: float = 0.0

    def to_json(self) -> str:
        return to_json(asdict(self))

    def lines(self) -> list[str]:
        rows = [
            f"{'trial':<14} {self.metric:>12} {'days':>5}  {'':<13} overrides",
            *(
                f"{t.trial_id:<14} {_fmt(t.value):>12} {t.days:>5}  "
                f"{'error' if t.error else 'stopped early' if t.stopped_early else '':<13} "
                + (t.error if t.error else ", ".join(f"{k}={_short(v)}" for k, v in t.overrides.items()))
                for t in self.trials
            ),
        ]
        out = [
            f"mtrec tune {self.name}: {len(self.trials)} trial(s), {self.metric} ({self.mode}) on "
            f"{', '.join(self.eval_days)} after training {self.days[0]} .. {self.days[-1]}",
            *rows,
        ]
        out.append(
            f"best: {self.best.trial_id} {self.metric} {_fmt(self.best.value)}"
            + (
                f", worst {self.worst.trial_id} {_fmt(self.worst.value)}, margin {_fmt(self.margin)}"
                if self.worst is not None
                else ""
            )
        )
        out.append(f"best config: {self.best_config}" + (f" and {self.out}" if self.out else ""))
        out.append(f"mlflow: parent run {self.parent_run_id} in experiment {self.experiment} at {self.tracking_uri}")
        return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def search_folder(cfg: MtrecConfig, name: str) -> str:
    return join(str(cfg.job.workdir), "tune", name)


def run_tune(
    cfg: MtrecConfig,
    space: SearchSpace,
    start: dt.date,
    end: dt.date,
    opts: TuneOptions | None = None,
    source: str | None = None,
) -> TuneSummary:
    """Search `space` over `cfg` (the base config) trained on `start` .. `end`, scored on the
    `opts.eval_days` days after `end`; resume the search of the same name if it exists.

    Args:
        source: the base config's file (or shipped name) `best.yaml` is written from; default
            `cfg` itself (resolved paths).

    Raises:
        ConfigError: a bad space, metric or key (before Ray starts), a search of this name started
            with other arguments, or every trial failed (the first one's error).
        DataValidationError: a training or eval day without logs.
    """
    from mtrec.jobs.evaluate import logged_days
    from mtrec.jobs.protocol import date_range, days_with_logs, preflight

    opts = opts or TuneOptions()
    t0 = time.perf_counter()
    days = days_with_logs(cfg, date_range(start, end), f"mtrec tune {start} .. {end}")
    if opts.eval_days < 1:
        raise ConfigError(f"--eval-days must be >= 1, got {opts.eval_days}; pass --eval-days 1 or more")
    first_eval, last_eval = end + dt.timedelta(days=1), end + dt.timedelta(days=opts.eval_days)
    try:
        eval_days = logged_days(cfg, first_eval, last_eval)
    except DataValidationError as e:
        raise e.reworded(
            f"no eval day: every trial is scored on the {opts.eval_days} day(s) after --to {end} "
            f"({first_eval} .. {last_eval}), which have no logs under {cfg.job.logs}; pass an earlier --to "
            "or write those days"
        ) from None
    check_search(cfg, space, eval_days)
    preflight(cfg, days)  # each day's files, rows and columns from their footers, before Ray starts
    if space.scheduler.name == SchedulerName.ASHA and space.scheduler.grace_period > len(days):
        raise ConfigError(
            f"search space: `scheduler.grace_period: {space.scheduler.grace_period}` is more than the "
            f"{len(days)} training day(s) of {start} .. {end}; lower it or train more days"
        )
    name = opts.name or f"{cfg.name}-{start}-{end}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"--name {name!r}: use letters, digits, `.`, `_` and `-` (it names a folder)")
    root = search_folder(cfg, name)
    parent, resumed = _parent_run(search_tracker(cfg), root, _search_key(cfg, space, days, eval_days), name)
    base = cfg.model_dump(mode="json")
    job = TrialJob(
        base=base,
        days=[d.isoformat() for d in days],
        eval_days=[d.isoformat() for d in eval_days],
        root=root,
        metric=space.metric,
        keys=list(space.space),
        threads=max(1, (os.cpu_count() or 1) // space.concurrent),
    )
    runs = _TrialRuns(base, parent, name, len(days), space.metric)
    log.info(
        f"mtrec tune {name}: {space.trials} trial(s) over {len(space.space)} key(s), "
        f"{space.metric} ({space.direction()}) on {_days(eval_days)} after training {_days(days)}, "
        f"{space.concurrent} at a time; folder {root}" + ("; resuming" if resumed else "")
    )
    grid = _fit(cfg, space, job, runs, opts)
    fields = {**_summarize(grid, space, job), "name": name, "folder": root, "parent_run_id": parent}
    summary = _finish(cfg, space, {**fields, "resumed": resumed}, job, source, opts)
    summary.wall_s = time.perf_counter() - t0
    for line in summary.lines():
        log.info(line)
    return summary


def _days(days: list[dt.date]) -> str:
    return str(days[0]) if len(days) == 1 else f"{days[0]} .. {days[-1]} ({len(days)} days)"


def _search_key(cfg: MtrecConfig, space: SearchSpace, days: list[dt.date], eval_days: list[dt.date]) -> dict:
    """What makes a rerun the same search (so it may resume it)."""
    return {
        "model": cfg.name,
        "config": cfg.model_dump(mode="json", exclude={"job": {"workdir"}, "tracking": True}),
        "space": space.model_dump(mode="json"),
        "days": [d.isoformat() for d in days],
        "eval_days": [d.isoformat() for d in eval_days],
    }


def _parent_run(tracker, root: str, key: dict, name: str) -> tuple[str, bool]:
    """(the search's MLflow parent run, resumed?): read from <root>/search.json, else created and
    written there before Tune starts (so a search killed at any point reuses it)."""
    fs, path = filesystem(join(root, "search.json"))
    if fs.exists(path):
        with fs.open(path, "r") as fh:
            saved = json.loads(fh.read())
        if saved["key"] != key:
            what = [k for k in key if saved["key"].get(k) != key[k]]
            raise ConfigError(
                f"a search named {name} with another {', '.join(what)} is in {root}; pass another --name, or the "
                "same config, space and days to resume it"
            )
        tracker.call("reopening the search's run", tracker.client.update_run, saved["parent_run_id"], "RUNNING")
        return saved["parent_run_id"], True
    run = tracker.call(
        "starting the search's run",
        tracker.client.create_run,
        tracker.experiment_id(),
        run_name=name,
        tags={"mtrec.tune.name": name, "mtrec.tune.folder": root, "mtrec.kind": "tune"},
    )
    run_id = run.info.run_id
    space = key["space"]
    tracker.log_params(
        run_id,
        {
            "metric": space["metric"],
            "mode": str(space["mode"]),
            "trials": str(space["trials"]),
            "seed": str(space["seed"]),
            "scheduler": json.dumps(space["scheduler"]),
            "space": json.dumps(space["space"]),
            "days": f"{key['days'][0]}..{key['days'][-1]}",
            "eval_days": ",".join(key["eval_days"]),
        },
    )
    _write(join(root, "search.json"), json.dumps({"parent_run_id": run_id, "key": key}, indent=2))
    return run_id, False


def _storage(root: str):
    """(Tune's storage_path, its name, a pyarrow filesystem or None) for the search folder `root`:
    a local path as is, any other fsspec URL through pyarrow's fsspec handler."""
    parent, _, name = root.rstrip("/").rpartition("/")
    if is_local(root):
        return os.path.abspath(local_path(parent)), name, None
    import pyarrow.fs as pafs

    fs, path = filesystem(parent)
    return path, name, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _fit(cfg: MtrecConfig, space: SearchSpace, job: TrialJob, runs: _TrialRuns, opts: TuneOptions):
    """Ray Tune over the trials (restored when Tune's state is in the folder); the ResultGrid."""
    from mtrec.jobs.cluster import quiet_ray, ray_session

    quiet_ray()
    from ray import tune

    storage, name, pafs = _storage(job.root)
    trainable = tune.with_resources(tune.with_parameters(_trial, job=job), {"cpu": TRIAL_CPUS})
    workers = cfg.train.num_workers * cfg.train.cpus_per_worker
    extra = space.concurrent * TRIAL_CPUS + (space.concurrent - 1) * workers
    path = f"{storage}/{name}"
    with ray_session(cfg, opts.address, opts.ray_logs, extra_cpus=extra):
        if not verbose():  # a failed trial is one line of ours, not Tune's traceback (after quiet_ray's levels)
            logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        if _restorable(job.root) and tune.Tuner.can_restore(path, storage_filesystem=pafs):
            log.info(f"restoring the search from Tune's state in {job.root}")
            tuner = tune.Tuner.restore(
                path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=pafs
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={k: d.tune_domain() for k, d in space.space.items()},
                tune_config=tune.TuneConfig(
                    metric=OBJECTIVE,
                    mode=space.direction().value,
                    num_samples=space.trials,
                    search_alg=_searcher(space),
                    scheduler=_scheduler(space, len(job.days)),
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage,
                    storage_filesystem=pafs,
                    verbose=0,
                    callbacks=[_callback(runs)],
                    failure_config=tune.FailureConfig(max_failures=0),  # a job retries its own workers
                ),
            )
        # Tune prints its own tables on stdout whatever its verbosity: stdout carries only --json
        shown = sys.stderr if opts.ray_logs or verbose() else io.StringIO()
        try:
            with contextlib.redirect_stdout(shown):
                return tuner.fit()
        except Exception as e:  # noqa: BLE001 - Tune's own failure (e.g. MLflow down in the callback): one line
            cause = _mtrec_cause(e)
            raise cause.reworded(f"the search stopped: {cause}") from None


def _mtrec_cause(err: BaseException) -> MtrecError:
    """The mtrec error behind `err`, else `err` as one line. Ray hands a trial's error over as a
    RayTaskError(ConfigError) whose text is the trial's traceback (the error itself is its `cause`);
    Tune re-raises a callback's error as a TuneError holding the traceback as text (`__context__`)."""
    seen, e, last = set(), err, err
    while e is not None and id(e) not in seen:
        if isinstance(e, MtrecError) and type(e).__module__ == MtrecError.__module__:
            return e
        seen.add(id(e))
        last = e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return MtrecError(f"{first_line(last, typed=True)}; see the Ray logs (--verbose)")


def _restorable(root: str) -> bool:
    """Whether Tune saved its experiment state in the folder: a search killed in its first seconds
    (tuner.pkl written, no state yet) starts afresh instead of failing to restore."""
    fs, path = filesystem(root)
    return bool(fs.glob(f"{path.rstrip('/')}/experiment_state-*.json"))


def _searcher(space: SearchSpace):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # max_concurrent here: Tune applies `max_concurrent_trials` only to a searcher it builds itself
    return BasicVariantGenerator(max_concurrent=space.concurrent, random_state=space.seed)


def _scheduler(space: SearchSpace, days: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = space.scheduler
    if s.name == SchedulerName.NONE:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration", max_t=days, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )


def _summarize(grid, space: SearchSpace, job: TrialJob) -> dict:
    """Per trial: its overrides, its metric per day (a day re-reported after a resume counted
    once), stopped early or failed; the best trial among those that trained every day, the worst."""
    if grid.num_terminated + grid.num_errors < len(grid) or len(grid) < space.trials:
        raise KeyboardInterrupt  # Tune stopped on a signal: its state is saved, a rerun resumes
    trials = []
    for result in grid:
        curve: dict[int, float | None] = {}
        df = result.metrics_dataframe
        if df is not None and OBJECTIVE in df:
            for it, v in zip(df["training_iteration"], df[OBJECTIVE], strict=True):
                curve[int(it)] = None if v is None or not math.isfinite(float(v)) else float(v)
        days = max(curve, default=0)
        trials.append(
            TrialSummary(
                trial_id=Path(result.path).name,
                overrides={k: result.config[k] for k in job.keys},
                days=days,
                value=curve.get(days),
                curve=[curve.get(i + 1) for i in range(days)],
                stopped_early=result.error is None and days < len(job.days),
                error=_error_line(result.error) if result.error else None,
            )
        )
    sign = 1 if space.direction() == Mode.MAX else -1
    scored = [t for t in trials if t.error is None and t.value is not None]
    complete = [t for t in scored if t.days == len(job.days)] or scored
    key = lambda t: sign * t.value  # noqa: E731
    best = max(complete, key=key, default=None)
    worst = min(scored, key=key, default=None)
    if best is None:
        failed = next((r for r in grid if r.error), None)
        cause = _mtrec_cause(failed.error) if failed is not None else MtrecError("no trial reported a metric")
        raise cause.reworded(f"no trial of the search finished a day; the first failure: {cause}") from None
    trials.sort(key=lambda t: (t.error is not None, t.value is None, -sign * (t.value or 0.0), -t.days))
    return {
        "trials": trials,
        "best": best,
        "worst": worst,
        "margin": abs(best.value - worst.value) if worst is not None else None,
    }


def best_config(source: dict, overrides: dict[str, Any], label: str) -> str:
    """The base config file's keys (as written: its paths, its comments lost) with `overrides`
    applied, as YAML; validated like any config."""
    data = copy.deepcopy(source)
    for key, value in overrides.items():
        set_key(data, key, value)
    parse_config(data, label)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def _write(url: str, text: str) -> None:
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w") as fh:
        fh.write(text)


def _finish(cfg: MtrecConfig, space: SearchSpace, fields: dict, job: TrialJob, source: str | None, opts: TuneOptions):
    """best.yaml (folder and --out), the trials' runs closed, the parent run's results; the summary."""
    import tempfile

    tracker = search_tracker(cfg)
    s = TuneSummary(
        metric=space.metric,
        mode=space.direction().value,
        days=job.days,
        eval_days=job.eval_days,
        experiment=tracker.experiment,
        tracking_uri=tracker.uri,
        best_config=join(job.root, "best.yaml"),
        out=opts.out,
        **fields,
    )
    children = tracker.call(
        "searching the trials' runs",
        tracker.client.search_runs,
        [tracker.experiment_id()],
        f"tags.`mlflow.parentRunId` = '{s.parent_run_id}'",
        max_results=5000,
    )
    by_trial = {r.data.tags.get("mtrec.tune.trial_id"): r for r in children}
    for t in s.trials:
        run = by_trial.get(t.trial_id)
        t.run_id = run.info.run_id if run is not None else None
        if run is not None and run.info.status == "RUNNING":  # a trial whose end the callback did not see
            tracker.end_run(run.info.run_id, "FAILED" if t.error else "FINISHED")
    data, label = read_config_dict(source) if source else (cfg.model_dump(mode="json"), "base config")
    text = (
        f"# mtrec tune {s.name}: {label} with the best trial's overrides ({s.best.trial_id}: {s.metric} "
        f"{_fmt(s.best.value)} on {', '.join(s.eval_days)} after training {s.days[0]} .. {s.days[-1]})\n"
        + best_config(data, s.best.overrides, f"best.yaml of {s.name}")
    )
    _write(s.best_config, text)
    if opts.out:
        _write(opts.out, text)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "best.yaml").write_text(text)
        Path(tmp, "trials.json").write_text(s.to_json())
        tracker.log_artifacts(s.parent_run_id, tmp)
    metrics = {
        f"best/{s.metric}": s.best.value,
        "trials": len(s.trials),
        "trials_stopped_early": sum(t.stopped_early for t in s.trials),
        "trials_failed": sum(t.error is not None for t in s.trials),
    }
    if s.worst is not None:
        metrics.update({f"worst/{s.metric}": s.worst.value, f"margin/{s.metric}": s.margin})
    tracker.log_metrics(s.parent_run_id, metrics)
    tracker.set_tags(
        s.parent_run_id,
        {"mtrec.tune.best_trial": s.best.trial_id, "mtrec.tune.best_run_id": s.best.run_id or ""},
    )
    tracker.end_run(s.parent_run_id)
    return s
