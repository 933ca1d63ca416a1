"""`mtrec submit`: run an mtrec job on a Ray cluster (Ray Job Submission API), stream it, exit with its status."""

from __future__ import annotations

import argparse


def add(sub, abbrev: bool = True) -> None:
    p = sub.add_parser(
        "submit",
        help="run an mtrec job on a Ray cluster (Ray Job Submission API), stream it, exit with its status",
        usage="mtrec submit [--address URL] [--no-wait] [--env KEY[=VALUE]] [--installed] -- COMMAND ...\n"
        "       mtrec submit [--address URL] (--status ID | --attach ID | --stop ID)",
        allow_abbrev=abbrev,
    )
    p.add_argument(
        "--address", help="the head's job server, http://HEAD:8265 (default: RAY_ADDRESS when it is an http URL)"
    )
    p.add_argument(
        "--no-wait", action="store_true", help="print the submission id and return instead of streaming the job"
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help=(
            "env var for the job (repeatable; KEY alone copies this shell's value); "
            "MLFLOW_TRACKING_URI is always forwarded"
        ),
    )
    p.add_argument(
        "--installed",
        action="store_true",
        help="run the mtrec installed on the cluster instead of uploading this one's code",
    )
    p.add_argument("--entrypoint-cpus", type=float, default=0.0, help="CPUs reserved for the job's driver (default 0)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--status", metavar="ID", help="print a submitted job's status")
    g.add_argument("--attach", metavar="ID", help="stream a submitted job's output and exit with its status")
    g.add_argument("--stop", metavar="ID", help="stop a submitted job")
    p.add_argument(
        "job_argv",
        nargs=argparse.REMAINDER,
        metavar="command",
        help="after `--`: the mtrec command to run, e.g. -- nightly --date yesterday",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mtrec.cli import remote as submit

    if args.status:
        return submit.status(args.address, args.status)
    if args.stop:
        return submit.stop(args.address, args.stop)
    if args.attach:
        return submit.attach(submit.client(args.address), args.attach)
    command = args.job_argv[1:] if args.job_argv[:1] == ["--"] else args.job_argv
    return submit.submit(
        args.address,
        command,
        wait=not args.no_wait,
        env=args.env,
        installed=args.installed,
        entrypoint_cpus=args.entrypoint_cpus,
    )
