"""Flags and helpers the sub-commands share."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("mtrec.cli")


def add_common(p: argparse.ArgumentParser, date: bool = True) -> None:
    p.add_argument(
        "--config",
        default="esmm",
        help="YAML config path/URL, or a shipped example: esmm, esm2, mmoe, esmm_seq, dupn (default: esmm)",
    )
    p.add_argument("--logs", help="logs root URL (overrides job.logs)")
    p.add_argument("--workdir", help="work dir URL: quarantine, checkpoints, MLflow store (overrides job.workdir)")
    if date:
        p.add_argument(
            "--date", required=True, help="day to process: YYYY-MM-DD, or today / yesterday (resolved in job.timezone)"
        )


def add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force", action="store_true", help="retrain a day that is already published and replace its checkpoint"
    )
    p.add_argument("--workers", type=int, help="Ray Train workers = world size (overrides train.num_workers)")
    p.add_argument("--cpus-per-worker", type=float, help="logical CPUs per worker (overrides train.cpus_per_worker)")
    p.add_argument("--batch-size", type=int, help="rows per batch per worker (overrides train.batch_size)")
    p.add_argument(
        "--torch-threads", type=int, help="torch threads per worker, 0 = auto (overrides train.torch_threads)"
    )
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local cluster)")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--summary", help="also write the job summary (JSON) to this path/URL")
    p.add_argument(
        "--ray-logs",
        action="store_true",
        help="forward the Ray workers' output to this console (default: Ray's log files)",
    )


def add_scoring_flags(p: argparse.ArgumentParser, workers: str) -> None:
    """--workers (help `workers`: what it scores, and what without it) and --address, for the
    commands that can score on Ray Train workers with the model sharded."""
    p.add_argument("--workers", type=int, help=workers)
    p.add_argument("--address", help="Ray cluster to join with --workers (default: RAY_ADDRESS, else a local one)")


def load(args: argparse.Namespace):
    """The run spec of `--config` with `--logs` / `--workdir` applied."""
    from mtrec.config import load_config

    return load_config(args.config, logs=args.logs, workdir=args.workdir)


def day(args: argparse.Namespace, cfg, flag: str = "--date", value: str | None = None):
    """`--date` (or `value` for `flag`) as a date; today / yesterday in the config's timezone."""
    from mtrec.data.io import parse_date

    return parse_date(value if value is not None else args.date, flag, cfg.job.timezone)


def train_cfg(args: argparse.Namespace):
    """The run spec with the training jobs' command-line overrides."""
    cfg = load(args)
    train = {
        k: v
        for k, v in {
            "num_workers": args.workers,
            "cpus_per_worker": args.cpus_per_worker,
            "batch_size": args.batch_size,
            "torch_threads": args.torch_threads,
        }.items()
        if v is not None
    }
    return cfg.with_train(**train) if train else cfg


def run_options(args: argparse.Namespace, **flags: bool):
    """The jobs' RunOptions from the common training flags and the sub-command's own `flags`."""
    from mtrec.jobs.plan import RunOptions

    return RunOptions(
        force=args.force,
        address=args.address,
        log_every=args.log_every,
        ray_logs=args.ray_logs,
        summary=args.summary,
        **flags,
    )


def relative_day(args: argparse.Namespace, cfg, run):
    """`run()`, its error naming what a relative `--date` (today / yesterday) resolved to."""
    from mtrec.data.io import RELATIVE_DAYS
    from mtrec.errors import MtrecError

    try:
        return run()
    except MtrecError as e:
        if str(args.date).lower() not in RELATIVE_DAYS:
            raise
        raise e.reworded(f"{e} (--date {args.date} is {day(args, cfg)} in {cfg.job.timezone})") from None


def print_json(data) -> None:
    """`data` as strict JSON on stdout, alone (progress goes to stderr): a metric that is not a
    number (AUC of a one-class slice) is `null`, never a bare NaN that JSON parsers reject."""
    from mtrec.log import to_json

    print(to_json(data), flush=True)


def tracking_env(cfg) -> None:
    """`models:/` URIs resolve against the config's tracking store (embedded sqlite by default)."""
    from mtrec.tracking import Tracker

    Tracker(cfg)  # sets MLflow's tracking and registry URIs for this process
