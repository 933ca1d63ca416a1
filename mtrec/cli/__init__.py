"""The `mtrec` command: one module per sub-command, each parsing its flags and calling a job.

Every sub-command exits non-zero with one line ``mtrec: error: <reason and fix>`` on bad input.
Progress goes to stderr through `logging` (the "mtrec" logger); stdout carries only what a
command is asked to print (`--json`), so it pipes into `jq` or `python -m json.tool`. Ray's and
MLflow's own log lines and warnings stay out of the way unless `--verbose`. Heavy imports happen
inside the sub-commands, so `mtrec --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from mtrec.cli import (
    backfill,
    bn_check,
    demo,
    evaluate,
    import_,
    inspect,
    nightly,
    predict,
    promote,
    submit,
    synth,
    train,
    tune,
    validate,
)
from mtrec.errors import MtrecError, StorageError, first_line
from mtrec.log import configure, reset

COMMANDS = (
    synth,
    import_,
    validate,
    train,
    nightly,
    backfill,
    evaluate,
    tune,
    predict,
    promote,
    bn_check,
    inspect,
    submit,
    demo,
)


def build_parser(abbrev: bool = True) -> argparse.ArgumentParser:
    """The whole command line; `abbrev=False` requires every flag written in full (`mtrec submit`
    checks a command it sends with it)."""
    parser = argparse.ArgumentParser(
        prog="mtrec", description="Nightly multi-task recommendation training (see README.md).", allow_abbrev=abbrev
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add(sub, abbrev)
    for p in sub.choices.values():
        p.add_argument(
            "--verbose", "-v", action="store_true", help="also show Ray's and MLflow's own log lines and warnings"
        )
    return parser


def _stores(args: argparse.Namespace) -> str:
    """ " on one of <the command's config's logs and workdir>", or "" (no config, or none that loads)."""
    if not hasattr(args, "config"):
        return ""
    try:
        from mtrec.config import load_config

        cfg = load_config(args.config, logs=getattr(args, "logs", None), workdir=getattr(args, "workdir", None))
    except Exception:  # noqa: BLE001 - only a hint for a message about another failure
        return ""
    return f" on one of job.logs {cfg.job.logs}, job.workdir {cfg.job.workdir}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(sys.stderr, args.verbose)
    try:
        return args.run(args)
    except MtrecError as e:
        print(f"mtrec: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # storage (a denied or vanished object, a store down after retries): one line
        if args.verbose:
            traceback.print_exc()
        where = f" on {e.filename}" if getattr(e, "filename", None) else _stores(args)
        err = StorageError(
            f"a storage operation failed{where} ({first_line(e, typed=True)}) after the client's retries; check the "
            "URL, the credentials and the store, then rerun (a nightly resumes where it stopped; --verbose shows where)"
        )
        print(f"mtrec: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("mtrec: interrupted", file=sys.stderr)
        return 130
    finally:
        reset()


if __name__ == "__main__":
    sys.exit(main())
