"""The `mtrec` command: one sub-command per job.

Every sub-command exits non-zero with one line ``mtrec: error: <reason and fix>`` on bad input;
heavy imports happen inside the sub-command so `mtrec --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mtrec.errors import MtrecError


def _common(p: argparse.ArgumentParser, date: bool = True) -> None:
    p.add_argument("--config", default="esmm", help="YAML config path/URL, or a shipped example: esmm, esm2, mmoe (default: esmm)")
    p.add_argument("--logs", help="logs root URL (overrides job.logs)")
    p.add_argument("--workdir", help="work dir URL: quarantine, checkpoints, MLflow store (overrides job.workdir)")
    if date:
        p.add_argument("--date", required=True, help="day to process: YYYY-MM-DD, or today / yesterday (resolved in job.timezone)")


def _say(line: str) -> None:
    print(line, flush=True)


def _resolved(text: str, cfg) -> str:
    """' (yesterday in Europe/Berlin)' when a relative --date was resolved, else ''."""
    from mtrec.data.io import RELATIVE_DAYS

    return f" ({text} in {cfg.job.timezone})" if text.lower() in RELATIVE_DAYS else ""


def cmd_synth(args: argparse.Namespace) -> int:
    from mtrec.data.io import parse_date
    from mtrec.data.synth import world_params, write_world

    start = parse_date(args.start, "--start")
    params = world_params(args.param, args.preset)
    _say(f"writing a synthetic world: {args.days} days x {args.rows_per_day:,} rows from {start} to {args.out} (seed {args.seed})"
         + (f"; preset {args.preset}" if args.preset else "") + "".join(f"; {kv}" for kv in args.param))
    s = write_world(args.out, args.days, args.rows_per_day, seed=args.seed, start=start,
                    files_per_day=args.files_per_day, params=params, progress=_say)
    _say(f"done: {sum(s.rows):,} rows in {sum(s.seconds):.1f}s; days {s.days[0]} .. {s.days[-1]}; truth under {args.out.rstrip('/')}/_truth/")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from mtrec.config import load_config
    from mtrec.data.io import parse_date
    from mtrec.jobs.protocol import validate

    cfg = load_config(args.config, logs=args.logs, workdir=args.workdir)
    day = parse_date(args.date, "--date", cfg.job.timezone)
    _say(f"validating {cfg.job.logs} dt={day} against {cfg.name}'s contract")
    report = validate(cfg, day)
    _say(report.summary())
    if args.json:
        print(report.to_json())
    return 0


def _train_cfg(args: argparse.Namespace):
    """The config with the training jobs' command-line overrides."""
    from mtrec.config import load_config

    cfg = load_config(args.config, logs=args.logs, workdir=args.workdir)
    train = {k: v for k, v in {"num_workers": args.workers, "cpus_per_worker": args.cpus_per_worker,
                               "batch_size": args.batch_size, "torch_threads": args.torch_threads}.items() if v is not None}
    return cfg.with_train(**train) if train else cfg


def _report(summaries, path: str | None) -> None:
    from mtrec.jobs.protocol import write_summary

    for s in summaries:
        if not s.skipped:
            for line in s.lines():
                _say(line)
    if path:
        write_summary(summaries[0] if len(summaries) == 1 else summaries, path)
        _say(f"summary: {path}")


def cmd_train(args: argparse.Namespace) -> int:
    from mtrec.data.io import parse_date
    from mtrec.jobs.retrain import run_train

    cfg = _train_cfg(args)
    start, end = parse_date(args.start, "--from", cfg.job.timezone), parse_date(args.end, "--to", cfg.job.timezone)
    _say(f"mtrec train {cfg.name}: full retrain over {start} .. {end} from {cfg.job.logs}")
    summary = run_train(cfg, start, end, address=args.address, say=_say, log_every=args.log_every, ray_logs=args.ray_logs, force=args.force)
    _report([summary], args.summary)
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from mtrec.data.io import parse_date
    from mtrec.jobs.nightly import run_nightly
    from mtrec.lock import model_lock

    cfg = _train_cfg(args)
    day = parse_date(args.date, "--date", cfg.job.timezone)
    _say(f"mtrec nightly {cfg.name}: {day}{_resolved(args.date, cfg)} from {cfg.job.logs}")
    if args.promote:
        from mtrec.jobs.nightly import require_tracking

        require_tracking(cfg)
    with model_lock(cfg, f"mtrec nightly {day}"):  # the gate below runs under the job's lock too
        pending = None
        if args.promote:
            from mtrec.jobs.nightly import gate_pending

            pending = gate_pending(cfg, day, say=_say)
        summaries = run_nightly(cfg, day, cold_start=args.cold_start, catch_up=args.catch_up, force=args.force,
                                allow_config_change=args.allow_config_change, address=args.address, say=_say,
                                log_every=args.log_every, ray_logs=args.ray_logs)
        _report(summaries, args.summary)
        if args.promote:
            from mtrec.jobs.nightly import gate_after

            gate_after(cfg, summaries, say=_say)
            if pending is not None:
                raise pending.reworded(f"{day} was trained and published, but before that {pending}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from mtrec.data.io import parse_date
    from mtrec.jobs.nightly import run_backfill

    cfg = _train_cfg(args)
    start, end = parse_date(args.start, "--from", cfg.job.timezone), parse_date(args.end, "--to", cfg.job.timezone)
    _say(f"mtrec backfill {cfg.name}: {start} .. {end} from {cfg.job.logs}")
    if args.promote:
        from mtrec.jobs.nightly import require_tracking

        require_tracking(cfg)
    summaries = run_backfill(cfg, start, end, cold_start=args.cold_start, force=args.force,
                             allow_config_change=args.allow_config_change, address=args.address, say=_say,
                             log_every=args.log_every, ray_logs=args.ray_logs)
    trained = [s for s in summaries if not s.skipped]
    _report(summaries, args.summary)
    _say(f"backfill done: {len(trained)} day(s) trained, {len(summaries) - len(trained)} already published")
    if args.promote:
        from mtrec.jobs.nightly import gate_after

        gate_after(cfg, summaries, say=_say)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mtrec.config import load_config
    from mtrec.data.io import parse_date
    from mtrec.jobs.predict import predict_to_parquet

    cfg = load_config(args.config, logs=args.logs, workdir=args.workdir)
    day = parse_date(args.date, "--date", cfg.job.timezone)
    _tracking_env(cfg)
    _say(f"mtrec predict: {args.model} on {cfg.job.logs} dt={day} -> {args.out}")
    out = predict_to_parquet(args.model, cfg.job.logs, day, args.out, say=_say)
    _say(f"wrote {out['rows']:,} rows from {out['files']} file(s) to {out['out']} in {out['seconds']:.1f}s "
         f"(columns: {', '.join(out['columns'])})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from mtrec.config import load_config
    from mtrec.data.io import parse_date
    from mtrec.tracking import promote

    cfg = load_config(args.config, logs=args.logs, workdir=args.workdir)
    if args.name and args.name != cfg.name:
        cfg = cfg.model_copy(update={"name": args.name})
    day = parse_date(args.date, "--date", cfg.job.timezone) if args.date else None
    decision = promote(cfg, version=args.version, day=day)
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps(asdict(decision), indent=2))
    return 0


def cmd_bn_check(args: argparse.Namespace) -> int:
    from mtrec.config import load_config
    from mtrec.data.io import parse_date
    from mtrec.errors import BNCheckFailed
    from mtrec.jobs.bn_check import run_bn_check

    cfg = load_config(args.config, logs=args.logs, workdir=args.workdir)
    day = parse_date(args.date, "--date", cfg.job.timezone)
    if args.model:
        _tracking_env(cfg)
    out = run_bn_check(cfg, day, model_uri=args.model, url=args.checkpoint, recalibrate=args.recalibrate, say=_say)
    final = out["after"] or out["before"]
    if args.json:
        import json

        print(json.dumps({"before": json.loads(out["before"].to_json()), "after": json.loads(out["after"].to_json()) if out["after"] else None,
                          "version": out["version"]}, indent=2))
    if not final.passed:
        raise BNCheckFailed(final.summary())
    return 0


def _tracking_env(cfg) -> None:
    """`models:/` URIs resolve against the config's tracking store (embedded sqlite by default)."""
    from mtrec.tracking import Tracker

    Tracker(cfg)  # sets MLflow's tracking and registry URIs for this process


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mtrec.config import load_config
    from mtrec.data.io import parse_date
    from mtrec.jobs.evaluate import evaluate_checkpoint

    cfg = load_config(args.config, logs=args.logs, workdir=args.workdir)
    day = parse_date(args.date, "--date", cfg.job.timezone)
    metrics, url, manifest = evaluate_checkpoint(cfg, day, args.checkpoint)
    _say(f"{cfg.name} checkpoint {url} (trained on {manifest['days'][0]} .. {manifest['days'][-1]}, "
         f"{manifest['rows_trained']:,} rows, {manifest['world_size']} worker(s)) on {day}:")
    for k in sorted(metrics):
        _say(f"  {k:<32} {metrics[k]:.4f}")
    if args.json:
        import json

        print(json.dumps({"checkpoint": url, "date": day.isoformat(), "metrics": metrics}, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mtrec.jobs.demo import run_demo

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    run_demo(workdir=args.workdir, days=args.days, rows_per_day=args.rows_per_day, seed=args.seed, models=models,
             workers=args.workers, say=_say)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from mtrec.jobs import submit

    if args.status:
        return submit.status(args.address, args.status, say=_say)
    if args.stop:
        return submit.stop(args.address, args.stop, say=_say)
    if args.attach:
        return submit.attach(submit.client(args.address), args.attach, say=_say)
    command = args.job_argv[1:] if args.job_argv[:1] == ["--"] else args.job_argv
    return submit.submit(args.address, command, wait=not args.no_wait, env=args.env, installed=args.installed,
                         entrypoint_cpus=args.entrypoint_cpus, say=_say)


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="retrain a day that is already published and replace its checkpoint")
    p.add_argument("--workers", type=int, help="Ray Train workers = world size (overrides train.num_workers)")
    p.add_argument("--cpus-per-worker", type=float, help="logical CPUs per worker (overrides train.cpus_per_worker)")
    p.add_argument("--batch-size", type=int, help="rows per batch per worker (overrides train.batch_size)")
    p.add_argument("--torch-threads", type=int, help="torch threads per worker, 0 = auto (overrides train.torch_threads)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local cluster)")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default 50)")
    p.add_argument("--summary", help="also write the job summary (JSON) to this path/URL")
    p.add_argument("--ray-logs", action="store_true", help="forward the Ray workers' output to this console (default: Ray's log files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtrec", description="Nightly multi-task recommendation training (see README.md).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("synth", help="write a synthetic multi-day world (logs + truth)")
    p.add_argument("--out", required=True, help="logs root to write (path or fsspec URL)")
    p.add_argument("--days", type=int, default=7, help="number of days (default 7)")
    p.add_argument("--rows-per-day", type=int, default=100_000, help="impressions per day (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--start", default="2026-01-01", help="first day, YYYY-MM-DD (default 2026-01-01)")
    p.add_argument("--files-per-day", type=int, default=4, help="Parquet files per day (default 4)")
    p.add_argument("--preset", help="a named variant of the default world, e.g. item_quality (docs/synthetic-world.md)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter of the generative model (repeatable; docs/synthetic-world.md lists them)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("validate", help="check one day's logs; print counts; write quarantine")
    _common(p)
    p.add_argument("--json", action="store_true", help="also print the report as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="full retrain over a date range on Ray (cold start)")
    _common(p, date=False)
    p.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD")
    p.add_argument("--to", dest="end", required=True, help="last day (inclusive), YYYY-MM-DD")
    _train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("nightly", help="one incremental day, warm-started from the day before's checkpoint")
    _common(p)
    p.add_argument("--cold-start", action="store_true", help="train the day from a fresh model (required when no earlier checkpoint exists)")
    p.add_argument("--catch-up", action="store_true", help="train missing days before --date first, in order (default: refuse a gap)")
    p.add_argument("--allow-config-change", action="store_true", help="warm-start although learning rates, batch size or seed changed")
    p.add_argument("--promote", action="store_true", help="then run the promotion gate on the new version (deferred while no later day has logs)")
    _train_flags(p)
    p.set_defaults(func=cmd_nightly)

    p = sub.add_parser("backfill", help="nightly for each day of a range, in order, skipping published days")
    _common(p, date=False)
    p.add_argument("--from", dest="start", required=True, help="first day, YYYY-MM-DD")
    p.add_argument("--to", dest="end", required=True, help="last day (inclusive), YYYY-MM-DD")
    p.add_argument("--cold-start", action="store_true", help="train the first day from a fresh model")
    p.add_argument("--allow-config-change", action="store_true", help="warm-start the first day although training settings changed")
    p.add_argument("--promote", action="store_true", help="then run the promotion gate on the last day's version")
    _train_flags(p)
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a day (default: the newest one before it)")
    _common(p)
    p.add_argument("--checkpoint", help="checkpoint URL (default: the newest published one before --date)")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="batch-score a day's logs with a logged model -> Parquet of per-task probabilities")
    _common(p)
    p.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/esmm_synth@champion, models:/esmm_synth/3, runs:/<id>/model")
    p.add_argument("--out", required=True, help="Parquet file to write (path or fsspec URL)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("promote", help="promotion gate: challenger vs champion on an unseen day; moves `champion` if it passes")
    _common(p, date=False)
    p.add_argument("--name", help="registered model name (default: the config's `name`)")
    p.add_argument("--version", help="version to judge (default: the `challenger` alias)")
    p.add_argument("--date", help="day to compare on (default: the newest day with logs neither model trained on)")
    p.add_argument("--json", action="store_true", help="also print the decision as JSON")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("bn-check", help="BatchNorm statistics of a model vs a day as served; --recalibrate fixes them")
    _common(p)
    p.add_argument("--model", help="MLflow model URI, e.g. models:/esmm_synth@challenger (default: the newest checkpoint before --date)")
    p.add_argument("--checkpoint", help="checkpoint URL instead of --model")
    p.add_argument("--recalibrate", action="store_true", help="recompute the BN statistics on --date and register the result as a new version")
    p.add_argument("--json", action="store_true", help="also print the reports as JSON")
    p.set_defaults(func=cmd_bn_check)

    p = sub.add_parser("submit", help="run an mtrec job on a Ray cluster (Ray Job Submission API), stream it, exit with its status",
                       usage="mtrec submit [--address URL] [--no-wait] [--env KEY[=VALUE]] [--installed] -- COMMAND ...\n"
                             "       mtrec submit [--address URL] (--status ID | --attach ID | --stop ID)")
    p.add_argument("--address", help="the head's job server, http://HEAD:8265 (default: RAY_ADDRESS when it is an http URL)")
    p.add_argument("--no-wait", action="store_true", help="print the submission id and return instead of streaming the job")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="env var for the job (repeatable; KEY alone copies this shell's value); MLFLOW_TRACKING_URI is always forwarded")
    p.add_argument("--installed", action="store_true", help="run the mtrec installed on the cluster instead of uploading this one's code")
    p.add_argument("--entrypoint-cpus", type=float, default=0.0, help="CPUs reserved for the job's driver (default 0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--status", metavar="ID", help="print a submitted job's status")
    g.add_argument("--attach", metavar="ID", help="stream a submitted job's output and exit with its status")
    g.add_argument("--stop", metavar="ID", help="stop a submitted job")
    p.add_argument("job_argv", nargs=argparse.REMAINDER, metavar="command",
                   help="after `--`: the mtrec command to run, e.g. -- nightly --date yesterday")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("demo", help="the whole story on a small synthetic world, on one machine")
    p.add_argument("--workdir", default="./mtrec-demo", help="where the demo writes everything (default ./mtrec-demo)")
    p.add_argument("--days", type=int, default=7, help="days in the synthetic world (default 7)")
    p.add_argument("--rows-per-day", type=int, default=100_000, help="impressions per day (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--models", default="esmm,mmoe", help="models to train, comma-separated: esmm, mmoe (default both)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers per job (default 2)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MtrecError as e:
        print(f"mtrec: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mtrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
