"""`mtrec demo`: the whole story on one machine, through the commands users run.

    1. a synthetic world of 7 days with known truth                      (mtrec synth)
    2. per model (ESMM with BatchNorm; MMoE with the position-bias shallow tower):
       full retrain of days 1-3 on Ray with 2 workers, version 1 -> champion
                                                       (mtrec train, mtrec promote)
    3. nightly days 4, 5, 6: warm start from the day before, evaluated on the next day,
       BN-checked, registered, through the promotion gate  (mtrec nightly --promote)
    4. a summary table, and the next commands to try

Everything is embedded: one local Ray cluster for the whole demo, the MLflow store in
`<workdir>/mlflow.db`, files under the workdir. Each step calls the job the command line calls (`run_train`,
`promote`, `run_nightly`) in this process; its output (and Ray's, MLflow's, torch's) goes to
`<workdir>/logs/<step>.log` while the console shows one progress line per step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import yaml

from mtrec.config import example_path, load_config
from mtrec.errors import ConfigError, MtrecError
from mtrec.log import redirected, to_json

log = logging.getLogger(__name__)

MODELS = ("esmm", "mmoe")
MARKER = ".mtrec-demo"
WRITES = {
    MARKER,
    "world",
    "configs",
    "logs",
    "checkpoints",
    "quarantine",
    "locks",
    "mlartifacts",
    "mlflow.db",
    "ray",
    "summary.json",
    "scores.parquet",
}  # what a demo (and the next commands it prints) put in its workdir
TRAIN_DAYS = 3
OK_CODES = {0, 5}  # 5: the gate refused the new version; part of the story, not a failure


@dataclass
class DemoRow:
    """One training job of the demo, as the summary shows it."""

    model: str
    kind: str  # full_retrain | nightly
    days: str
    rows: int = 0
    wall_s: float = 0.0
    rows_per_s: float = 0.0
    eval_day: str | None = None
    metrics: dict = field(default_factory=dict)
    bn: str = ""
    version: str | None = None
    gate: str = ""
    exit_code: int = 0
    log: str = ""


class _Step:
    """Run one step with fds 1 and 2 sent to its log file; the console shows its progress."""

    def __init__(self, console, log: Path, title: str):
        self.console, self.log, self.title = console, log, title
        self.tty = console.isatty()
        self.stop = threading.Event()

    def _show(self) -> None:
        t0 = time.perf_counter()
        width = shutil.get_terminal_size((100, 20)).columns
        while not self.stop.wait(0.5):
            last = ""
            with contextlib.suppress(OSError):
                tail = self.log.read_bytes()[-4000:].decode(errors="replace").replace("\r", "\n").strip().splitlines()
                last = next((ln for ln in reversed(tail) if ln.strip()), "")
            line = f"  ... {self.title} {time.perf_counter() - t0:5.0f}s  {last.strip()}"
            self.console.write("\r" + line[: width - 1].ljust(width - 1))
            self.console.flush()

    def __enter__(self) -> _Step:
        self.t0 = time.perf_counter()
        if not self.tty:
            self.console.write(f"  ... {self.title}\n")
            self.console.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        self.fh = self.log.open("ab")
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(self.fh.fileno(), 1)  # what writes to the fds: Ray, torch's C++ logs, subprocesses
        os.dup2(self.fh.fileno(), 2)
        # what writes to sys.stdout/err, whatever they are (pytest, Jupyter)
        self.text = self.log.open("a", buffering=1)
        self.redirects = contextlib.ExitStack()
        self.redirects.enter_context(contextlib.redirect_stdout(self.text))
        self.redirects.enter_context(contextlib.redirect_stderr(self.text))
        self.redirects.enter_context(redirected(self.text))  # the jobs' progress lines
        if self.tty:
            self.thread = threading.Thread(target=self._show, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.redirects.close()
        self.text.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.fh.close()
        self.seconds = time.perf_counter() - self.t0
        if self.tty:
            self.stop.set()
            self.thread.join()
            self.console.write("\r" + " " * (shutil.get_terminal_size((100, 20)).columns - 1) + "\r")
        self.console.write(f"  {'done' if exc[0] is None else 'FAILED'} {self.title} ({self.seconds:.1f}s)\n")
        self.console.flush()


def _prepare(workdir: Path) -> None:
    """An empty workdir, or an earlier demo's: its entries are replaced. A folder the demo did not
    write, or one holding anything else besides, is refused and left as it is."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; pass a folder (the demo creates it)")
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise ConfigError(
                f"{workdir} exists and was not written by `mtrec demo`; "
                "pass another --workdir (the demo starts from an empty one)"
            )
        other = sorted(p.name for p in workdir.iterdir() if p.name not in WRITES)
        if other:
            raise ConfigError(
                f"{workdir} holds an earlier demo and also {', '.join(other[:5])}, which the demo did not write; "
                "move them, or pass another --workdir"
            )
        print(f"replacing the earlier demo in {workdir}", flush=True)
        for p in workdir.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text(
        "written by `mtrec demo`; the next `mtrec demo` with this --workdir replaces what it wrote here\n"
    )


def demo_config(example: str, workdir: Path, logs: str, workers: int) -> Path:
    """The shipped example pointed at the demo's world and workdir, with 2 workers; written where a
    user can read it. The examples' towers have BatchNorm, so the BN check has statistics to check."""
    d = yaml.safe_load(example_path(example).read_text())
    d["job"].update(logs=logs, workdir=str(workdir))
    d["train"].update(num_workers=workers, cpus_per_worker=1)
    # the demo's own store, whatever MLFLOW_TRACKING_URI says: it must not register versions on a real server
    d.setdefault("tracking", {})["uri"] = f"sqlite:///{workdir}/mlflow.db"
    path = workdir / "configs" / f"{example}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"# mtrec/configs/{example}.yaml as `mtrec demo` runs it\n" + yaml.safe_dump(d, sort_keys=False))
    load_config(str(path))  # valid, or the demo is broken
    return path


def run_demo(
    workdir: str = "./mtrec-demo",
    days: int = 7,
    rows_per_day: int = 100_000,
    seed: int = 0,
    models: tuple[str, ...] = MODELS,
    workers: int = 2,
) -> dict:
    """Run the demo and print its summary (on stdout: it is what the command is for).

    Returns:
        dict: {"workdir", "tracking_uri", "rows": [DemoRow as dict], "seconds": {step: s},
        "models": {name: registered name}}.
    """
    from mtrec.data.synth import write_world
    from mtrec.jobs.nightly import run_nightly
    from mtrec.jobs.plan import RunOptions
    from mtrec.jobs.retrain import run_train
    from mtrec.tracking import promote

    if days < TRAIN_DAYS + 2:
        raise ConfigError(
            f"--days {days}: the demo needs at least {TRAIN_DAYS + 2} (a {TRAIN_DAYS}-day retrain, a nightly, "
            "and a day to judge it)"
        )
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    root = Path(workdir).expanduser().resolve()
    _prepare(root)
    logs, logdir = str(root / "world"), root / "logs"
    logdir.mkdir()
    sys.stdout.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1)  # the terminal, while the steps' fds 1/2 go to their logs
    print(f"mtrec demo: everything goes under {root} (step logs in {logdir})", flush=True)
    seconds: dict[str, float] = {}

    def step(name: str, title: str) -> _Step:
        return _Step(console, logdir / f"{name}.log", title)

    with step("synth", f"synthetic world: {days} days x {rows_per_day:,} rows") as s:
        summary = write_world(logs, days, rows_per_day, seed=seed)
    seconds["synth"] = s.seconds
    day_list = [dt.date.fromisoformat(d) for d in summary.days]

    import ray

    from mtrec.jobs.cluster import local_cpus, local_startup_concurrency, quiet_ray
    from mtrec.log import library_level

    configs = {m: demo_config(m, root, logs, workers) for m in models}
    quiet_ray()
    cfg0 = load_config(str(next(iter(configs.values()))))
    with step("ray", "starting a local Ray cluster") as s:
        local_startup_concurrency(local_cpus(cfg0))
        ray.init(
            address="local",
            num_cpus=local_cpus(cfg0),
            include_dashboard=False,
            log_to_driver=False,
            logging_level=library_level(),
        )
    seconds["ray"] = s.seconds
    rows: list[DemoRow] = []
    names = {}
    try:
        for m, path in configs.items():
            cfg = load_config(str(path))
            names[m] = cfg.name
            first, last_train = day_list[0], day_list[TRAIN_DAYS - 1]
            out = logdir / f"{m}-train.json"
            with step(f"{m}-train", f"{m}: full retrain {first} .. {last_train} ({workers} workers)") as s:
                code = _attempt(partial(run_train, cfg, first, last_train, RunOptions(summary=str(out))))
            _check(code, {0}, s)
            seconds[f"{m}-train"] = s.seconds
            with step(f"{m}-promote", f"{m}: version 1 -> champion") as s:
                code = _attempt(partial(promote, cfg))
            _check(code, {0}, s)
            seconds[f"{m}-promote"] = s.seconds
            rows.append(_row(m, "full_retrain", out))
            for d in day_list[TRAIN_DAYS : days - 1]:
                out = logdir / f"{m}-nightly-{d}.json"
                with step(f"{m}-nightly-{d}", f"{m}: nightly {d} (warm start, BN check, gate)") as s:
                    code = _attempt(partial(run_nightly, cfg, d, RunOptions(promote=True, summary=str(out))))
                _check(code, OK_CODES, s)
                seconds[f"{m}-nightly-{d}"] = s.seconds
                rows.append(_row(m, "nightly", out))
                rows[-1].exit_code, rows[-1].log = code, str(s.log)
    finally:
        ray.shutdown()
        console.close()
    uri = f"sqlite:///{root}/mlflow.db"
    _gates(rows, names, uri)
    total = sum(seconds.values())
    lines = [
        *summary_lines(rows, uri),
        f"\ndemo took {total:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()),
        "\nnext:",
        f"  .venv/bin/mlflow ui --backend-store-uri {uri}      # runs, metrics, plots, versions, aliases",
    ]
    if models:
        m = models[0]
        lines += [
            f"  .venv/bin/mtrec predict --config {configs[m]} --date {day_list[-1]} --model "
            f"models:/{names[m]}@champion --out {root}/scores.parquet",
            f"  .venv/bin/mtrec nightly --config {configs[m]} --date {day_list[-1]} --promote"
            "   # train the last day yourself",
            f"  .venv/bin/mtrec bn-check --config {configs[m]} --date {day_list[-1]} --model "
            f"models:/{names[m]}@champion",
        ]
    print("\n".join(lines), flush=True)
    result = {
        "workdir": str(root),
        "tracking_uri": uri,
        "rows": [r.__dict__ for r in rows],
        "seconds": seconds,
        "models": names,
    }
    (root / "summary.json").write_text(to_json(result))
    return result


def _attempt(job) -> int:
    """Run one step's job: 0, or the exit code of the MtrecError it raised (its line goes to the step's log)."""
    try:
        job()
    except MtrecError as e:
        log.error(f"mtrec: error: {e}")
        return e.exit_code
    return 0


def _check(code: int, ok: set[int], s: _Step) -> None:
    if code == 130:
        raise KeyboardInterrupt
    if code not in ok:
        tail = s.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        err = MtrecError(f"the demo step `{s.title}` failed (exit {code}): {tail[0]}; its whole output is in {s.log}")
        err.exit_code = code  # the step's own: 3 bad data, 6 MLflow, ...
        raise err


def _row(model: str, kind: str, summary_json: Path) -> DemoRow:
    s = json.loads(summary_json.read_text())
    s = s[-1] if isinstance(s, list) else s
    ml = s.get("mlflow", {})
    days = s["days"]
    return DemoRow(
        model=model,
        kind=kind,
        days=days[0] if len(days) == 1 else f"{days[0]}..{days[-1][5:]}",
        rows=s["rows"],
        wall_s=s["wall_s"],
        rows_per_s=s["rows_per_s"],
        eval_day=ml.get("eval_day"),
        metrics=ml.get("metrics") or {},
        bn=ml.get("bn", ""),
        version=str(ml.get("version")) if ml.get("version") else None,
    )


def _gates(rows: list[DemoRow], names: dict[str, str], uri: str) -> None:
    """The gate's decision on each version, from its tags in the registry."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, uri)
    for r in rows:
        if not r.version:
            continue
        tags = client.get_model_version(names[r.model], r.version).tags
        decision = tags.get("mtrec.gate.decision")
        if decision == "promoted":
            r.gate = (
                "champion (first)"
                if not tags.get("mtrec.gate.champion")
                else f"promoted over v{tags['mtrec.gate.champion']}"
            )
        elif decision == "refused":
            r.gate = (
                f"refused (champion v{tags['mtrec.gate.champion']} stays)"
                if tags.get("mtrec.gate.champion")
                else "refused (no champion yet)"
            )
        else:
            r.gate = "not judged yet"  # a nightly whose next day has no logs yet: the next night's gate judges it
        if r.exit_code == 5 and not r.gate.startswith(
            "refused"
        ):  # exit 5 without a refusal on record: not the gate saying no
            raise MtrecError(
                f"the nightly {r.days} of {r.model} exited 5 but version {r.version} has no refusal recorded; "
                f"see {r.log}"
            )


def _fmt(x: float | None) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "-"


def summary_lines(rows: list[DemoRow], uri: str) -> list[str]:
    """The table a person reads: one row per training job."""
    head = (
        f"{'model':<6} {'job':<13} {'days':<18} {'rows':>8} {'wall s':>7} {'rows/s':>8}  {'next day':<10} "
        f"{'ctr AUC':>7} {'cvr AUC':>7} {'ctcvr AUC':>9} {'es-CVR AUC':>10} {'ctr unbiased':>12}  {'BN check':<12} "
        f"{'v':>2}  gate"
    )
    out = [
        "",
        "summary (AUCs on the day after each job's data; es-CVR: entire-space CVR AUC against the truth;",
        "         ctr unbiased: CTR AUC against the true relevance, position effect removed)",
        "",
        head,
        "-" * len(head),
    ]
    for r in rows:
        m = r.metrics
        out.append(
            f"{r.model:<6} {r.kind:<13} {r.days:<18} {r.rows:>8,} {r.wall_s:>7.1f} {r.rows_per_s:>8,.0f}  "
            f"{r.eval_day or '-':<10} "
            f"{_fmt(m.get('ctr/auc')):>7} {_fmt(m.get('cvr/auc')):>7} {_fmt(m.get('ctcvr/auc')):>9} "
            f"{_fmt(m.get('cvr/auc_entire_space')):>10} {_fmt(m.get('ctr/auc_unbiased')):>12}  {r.bn or '-':<12} "
            f"{r.version or '-':>2}  {r.gate}"
        )
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        full, nightly = mine[0], mine[1:]
        if nightly:
            auc = [r.metrics.get("ctr/auc") for r in mine]
            cost = sum(r.wall_s for r in nightly) / len(nightly)
            trend = " -> ".join(_fmt(a) for a in auc)
            out.append(
                f"{model}: next-day ctr AUC {trend}; a nightly day took {cost:.1f}s on average vs {full.wall_s:.1f}s "
                f"for the {TRAIN_DAYS}-day full retrain ({cost / max(full.wall_s, 1e-9):.2f}x)"
            )
            oracle = next(
                (
                    r.metrics.get("cvr/auc_entire_space_oracle")
                    for r in mine
                    if r.metrics.get("cvr/auc_entire_space_oracle")
                ),
                None,
            )
            if oracle:
                out.append(f"{model}: entire-space CVR AUC ceiling (a model that knew the true CVR): {oracle:.4f}")
    out.append(f"MLflow: {uri}")
    return out
