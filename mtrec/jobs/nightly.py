"""`mtrec nightly` and `mtrec backfill`: incremental days, each warm-started from the day before.

    nightly D:  D published already?         -> nothing to do (exit 0) unless --force
                newest published day P < D:  P == D-1 -> warm start from dt=P, train D only
                                             a gap   -> refused, naming the missing days,
                                                        or (--catch-up) each missing day first
                                             none    -> refused, unless --cold-start
    backfill D1..D2: nightly for each day in order (published days skipped), one Ray session,
                stopping at the first failure with the day named.

With `job.allow_gaps`, days without logs are not gaps: a nightly for such a day does nothing, a
nightly after them warm-starts from the newest published day before them, and a backfill skips
them; each is said in one line.

Each job holds the model's lock from start to end (taken once, here) and, with `promote`, runs
the promotion gate under it: before training, the newest version an earlier night registered that
has `gate.days` unseen days with logs (with one day: the challenger) is judged; the new version
after. The cheap checks (the days' files, rows and columns, the parent) run before
Ray starts. The parent checkpoint is never chosen silently: it is the newest published day before
D, and a damaged or incompatible one fails the job rather than falling back to an older one or a
cold start.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import replace

from mtrec.config import MtrecConfig
from mtrec.errors import CheckpointError, ConfigError, MtrecError
from mtrec.jobs.cluster import ray_session
from mtrec.jobs.plan import RunOptions, TrainSummary, report
from mtrec.jobs.protocol import (
    already_published,
    check_stores,
    date_range,
    days_with_logs,
    has_logs,
    plan_job,
    preflight,
    run_job,
)
from mtrec.lock import model_lock
from mtrec.train import checkpoint

log = logging.getLogger(__name__)


def _fmt_days(days: list[dt.date]) -> str:
    if len(days) <= 4:
        return ", ".join(d.isoformat() for d in days)
    return f"{days[0]} .. {days[-1]} ({len(days)} days)"


def plan_nightly(
    cfg: MtrecConfig,
    day: dt.date,
    cold_start: bool = False,
    catch_up: bool = False,
    force: bool = False,
    gap_hint: str = "or pass --catch-up",
) -> tuple[list[dt.date], str | None]:
    """(days to train in order, the parent checkpoint of the first) for `mtrec nightly --date day`;
    ([], url) when the day is already published and not `force`.

    Raises:
        CheckpointError: no checkpoint before `day` without `cold_start`, or a gap without `catch_up`.
        ConfigError: `cold_start` and `catch_up` together (one starts fresh, the other fills a gap).
    """
    if cold_start and catch_up:
        raise ConfigError(
            "--cold-start and --catch-up contradict each other: a cold start ignores earlier days, catching up "
            "trains them; pass one"
        )
    published = checkpoint.published_days(cfg)
    if day in published and not force:
        return [], checkpoint.checkpoint_url(cfg, day)
    earlier = [d for d in published if d < day]
    if cold_start or not earlier:
        if not cold_start:
            raise CheckpointError(
                f"no published checkpoint of {cfg.name} before {day} under {checkpoint.checkpoint_root(cfg)}; "
                "pass --cold-start to train this day from a fresh model, or run `mtrec train` over the days before it"
            )
        return [day], None
    parent = earlier[-1]
    missing = (
        date_range(parent + dt.timedelta(days=1), day - dt.timedelta(days=1))
        if parent < day - dt.timedelta(days=1)
        else []
    )
    if missing and cfg.job.allow_gaps:
        quiet = [d for d in missing if not has_logs(cfg, d)]
        missing = [d for d in missing if d not in quiet]
        if quiet:
            log.info(f"no logs for {_fmt_days(quiet)}: skipped (job.allow_gaps); {day} warm-starts from dt={parent}")
    if missing and not catch_up:
        raise CheckpointError(
            f"missing day(s) {_fmt_days(missing)}: {cfg.name} has no published checkpoint for them "
            f"(the newest before {day} is dt={parent}); run `mtrec backfill --from {missing[0]} --to {missing[-1]}` "
            f"first, {gap_hint}"
        )
    return [*missing, day], checkpoint.checkpoint_url(cfg, parent)


def run_nightly(cfg: MtrecConfig, day: dt.date, opts: RunOptions | None = None) -> list[TrainSummary]:
    """The nightly job for `day` (and, with `opts.catch_up`, the missing days before it, in
    order), holding the model's lock throughout; with `opts.promote`, the promotion gate too.

    Returns:
        One TrainSummary per day trained; one with `skipped=True` when `day` was already published.

    Raises:
        LockHeld: another job is training this model.
        DataValidationError, CheckpointError: before Ray starts, for a missing, empty or
            column-less day, a gap, or a parent that does not fit.
        GateRefused: with `promote`, the gate refused a version (the days stay published).
    """
    opts = opts or RunOptions()
    if opts.promote:
        require_tracking(cfg)
    check_stores(cfg)
    with model_lock(cfg, f"mtrec nightly {day}"):
        # first: a version an earlier night registered is judged even when this night cannot train
        pending = gate_pending(cfg, day, opts.address) if opts.promote else None
        newest = checkpoint.published_days(cfg) if cfg.job.allow_gaps and not has_logs(cfg, day) else None
        target = _catch_up_target(cfg, day, newest) if newest and opts.catch_up else None
        if target is not None:
            log.info(f"no logs for {day}: catching up to {target}, the newest day with logs (job.allow_gaps)")
            day = target
        elif newest is not None:
            log.info(
                f"no logs for {day}: nothing to train (job.allow_gaps); the newest checkpoint stays "
                + (f"dt={newest[-1]}" if newest else "none")
            )
            summaries = [_no_logs(cfg, day, newest)]
            report(summaries, opts.summary)
            if pending is not None:
                raise pending.reworded(f"{day} has no logs, and before that {pending}")
            return summaries
        days, parent = plan_nightly(cfg, day, opts.cold_start, opts.catch_up, opts.force)
        if days:
            preflight(cfg, days, parent, opts.allow_config_change)
        if not days:
            log.info(f"{parent} is already published; nothing to do (--force retrains it and replaces it)")
            summaries = [already_published(cfg, [day], "nightly")]
        else:
            log.info(f"mtrec nightly {cfg.name}: {day} from {cfg.job.logs}")
            earlier = [d for d in checkpoint.published_days(cfg) if d < day]
            if opts.cold_start and earlier:
                log.info(f"cold start requested: not warm-starting from dt={earlier[-1]}")
            if len(days) > 1:
                log.info(f"catching up {len(days) - 1} missing day(s) before {day}: {_fmt_days(days[:-1])}")
            with ray_session(cfg, opts.address, opts.ray_logs) as info:
                summaries = _chain(cfg, days, parent, opts, info)
        report(summaries, opts.summary)
        if opts.promote:
            gate_after(cfg, summaries, opts.address)
            if pending is not None:
                raise pending.reworded(f"{day} was trained and published, but before that {pending}")
    return summaries


def _catch_up_target(cfg: MtrecConfig, day: dt.date, published: list[dt.date]) -> dt.date | None:
    """With --catch-up, for a `day` without logs: the newest day before it, after the newest
    published one, that has logs (the days a catch-up would train end there); None if none."""
    after = [d for d in published if d < day]
    if not after or after[-1] >= day - dt.timedelta(days=1):
        return None
    candidates = date_range(after[-1] + dt.timedelta(days=1), day - dt.timedelta(days=1))
    return next((d for d in reversed(candidates) if has_logs(cfg, d)), None)


def _no_logs(cfg: MtrecConfig, day: dt.date, published: list[dt.date]) -> TrainSummary:
    """The summary of a nightly for a day without logs (gaps allowed): nothing trained."""
    return TrainSummary(
        model=cfg.name,
        days=[day.isoformat()],
        world_size=cfg.train.num_workers,
        kind="nightly",
        skipped=True,
        checkpoint=checkpoint.checkpoint_url(cfg, published[-1]) if published else "",
    )


def require_tracking(cfg: MtrecConfig) -> None:
    """`--promote` compares registered versions: refused up front without MLflow tracking.

    Raises:
        ConfigError: `tracking.enabled` is false.
    """
    if not cfg.tracking.enabled:
        raise ConfigError(
            "--promote needs MLflow tracking (`tracking.enabled: true`): the gate compares registered versions"
        )


def gate_pending(cfg: MtrecConfig, day: dt.date, address: str | None = None) -> MtrecError | None:
    """`--promote`, before training `day`: a version an earlier night registered and no gate has
    judged yet is judged now, on the `gate.days` newest days with logs neither it nor the champion
    trained on (on a schedule: up to `day` itself). A nightly for yesterday can never judge its own
    version (no later day has logs yet), so this is where a scheduled job's versions get promoted.
    The version is the newest unjudged one with `gate.days` such days (`next_to_judge`): with one
    day, the challenger, the night after its data; with N days, the version N-1 nights older, while
    the newer ones wait for their days. Unjudged versions older than it are skipped (logged). With
    none ready, the challenger's gate defers. `address`: the job's Ray cluster, where the gate
    scores when it scores on workers (`train.num_workers` > 1, or a version without a pyfunc).

    Returns:
        The gate's refusal (training goes on; the caller reports it at the end), or None.
    """
    from mtrec.errors import GateDeferred, GateRefused
    from mtrec.tracking import CHAMPION, Tracker, promote
    from mtrec.tracking.gate import next_to_judge

    tracker = Tracker(cfg)
    versions = tracker.versions()
    chal, skipped = next_to_judge(cfg, versions, tracker.alias(CHAMPION))
    if chal is None:
        return None
    waiting = [v for v in versions if (v.date, int(v.version)) > (chal.date, int(chal.version))]
    log.info(
        f"gate: judging {'challenger' if not waiting else 'version'} v{chal.version} (trained to {chal.date}, "
        f"not judged yet) before training {day}"
        + (f"; newer {_versions(waiting)} wait for gate.days={cfg.gate.days} unseen days" if waiting else "")
        + (f"; skipping older unjudged {_versions(skipped)}, superseded" if skipped else "")
    )
    try:
        promote(cfg, version=chal.version, address=address)
    except GateDeferred as e:
        log.info(f"gate deferred: {e}")
    except GateRefused as e:
        log.info(f"gate: {e}")
        return e
    return None


def _versions(versions: list) -> str:
    """Registered versions as a log line names them: "v3 (to 2026-01-03), v2 (to 2026-01-02)"."""
    return ", ".join(f"v{v.version} (to {v.date})" for v in versions)


def gate_after(cfg: MtrecConfig, summaries: list[TrainSummary], address: str | None = None) -> None:
    """`--promote`: the promotion gate on the version the job registered, when a day after it
    already has logs (a backfill, a late rerun); otherwise it is deferred to `mtrec promote`.
    `address`: as for `gate_pending`.

    Raises:
        GateRefused: the gate refused it (the checkpoint stays published, `champion` stays).
    """
    from mtrec.errors import GateDeferred
    from mtrec.tracking import promote

    last = summaries[-1]
    version = last.mlflow.get("version")
    require_tracking(cfg)
    if not version:
        raise ConfigError(
            f"{last.checkpoint} has no registered version (it was trained without tracking); retrain it with --force "
            "to record and register it, or run `mtrec promote --version V` on a registered one"
        )
    try:
        promote(cfg, version=version, address=address)
    except GateDeferred as e:
        log.info(f"gate deferred: {e}")
    except MtrecError as e:
        raise e.reworded(f"{last.days[-1]} was trained and published (v{version}), but {e}") from None


def _chain(
    cfg: MtrecConfig, days: list[dt.date], parent: str | None, opts: RunOptions, info: dict
) -> list[TrainSummary]:
    """Nightly jobs for `days` in order, each from the previous one's checkpoint; the first failure
    stops the chain with its day named."""
    out = []
    for d in days:
        log.info(f"nightly {cfg.name} {d}: " + (f"warm start from {parent}" if parent else "cold start"))
        try:
            s = run_job(cfg, plan_job(cfg, [d], "nightly", parent, opts.allow_config_change), opts, info)
        except MtrecError as e:
            done = (
                f" (published before it: {_fmt_days([dt.date.fromisoformat(x.days[-1]) for x in out])})" if out else ""
            )
            raise e.reworded(f"day {d} failed{done}: {e}") from None
        out.append(s)
        parent = s.checkpoint
        opts = replace(opts, allow_config_change=False)  # only the first warm start crosses the settings change
    return out


def run_backfill(cfg: MtrecConfig, start: dt.date, end: dt.date, opts: RunOptions | None = None) -> list[TrainSummary]:
    """Nightly for every day of `start`..`end` in order; published days are skipped (unless
    `opts.force`), the first day warm-starts from the newest published day before it, which must
    be the day before (or `opts.cold_start`: the range's first day starts from a fresh model; a
    rerun after a failure, whose first day to train is later, warm-starts as usual). With
    `opts.promote`, the gate then judges the last day's version.

    Returns:
        One TrainSummary per day of the range (`skipped=True` for days already published).

    Raises:
        LockHeld: another job is training this model (the lock is held for the whole range).
        GateRefused: with `promote`, the gate refused the last version (the days stay published).
    """
    opts = opts or RunOptions()
    if opts.promote:
        require_tracking(cfg)
    days = days_with_logs(cfg, date_range(start, end), f"mtrec backfill {start} .. {end}")
    check_stores(cfg)
    with model_lock(cfg, f"mtrec backfill {start} .. {end}"):
        published = set(checkpoint.published_days(cfg))
        todo = days if opts.force else [d for d in days if d not in published]
        skipped = [d for d in days if d not in todo]
        if skipped:
            log.info(f"already published, skipped: {_fmt_days(skipped)}")
        out = {d: already_published(cfg, [d], "nightly") for d in skipped}
        if todo:
            preflight(cfg, todo)
            log.info(f"mtrec backfill {cfg.name}: {start} .. {end} from {cfg.job.logs}")
            _backfill(cfg, days, todo, opts, out)
        else:
            log.info(f"nothing to do: {start} .. {end} are all published")
        summaries = [out[d] for d in days]
        report(summaries, opts.summary)
        log.info(f"backfill done: {len(todo)} day(s) trained, {len(skipped)} already published")
        if opts.promote:
            gate_after(cfg, summaries, opts.address)
    return summaries


def _backfill(cfg: MtrecConfig, days: list[dt.date], todo: list[dt.date], opts: RunOptions, out: dict) -> None:
    """Train the `todo` days of the range `days` into `out` (day -> summary), in runs of
    consecutive days. Each run's first day warm-starts from the day before it: a skipped day in
    the middle is published, so plan the first day to train; every later one follows the chain."""
    with ray_session(cfg, opts.address, opts.ray_logs) as info:
        i = 0
        while i < len(todo):
            run = [todo[i]]
            # consecutive days of the range (with gaps allowed, of the days that have logs)
            while i + len(run) < len(todo) and days.index(todo[i + len(run)]) == days.index(run[-1]) + 1:
                run.append(todo[i + len(run)])
            # --cold-start is for the range's first day only: a rerun after a failure continues
            # from the last published day instead of starting over
            _, parent = plan_nightly(
                cfg,
                run[0],
                opts.cold_start and run[0] == days[0],
                catch_up=False,
                force=True,
                gap_hint="or start the backfill earlier",
            )
            preflight(cfg, [], parent, opts.allow_config_change)
            for s in _chain(cfg, run, parent, opts, info):
                out[dt.date.fromisoformat(s.days[-1])] = s
            i += len(run)
