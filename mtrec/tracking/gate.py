"""The promotion gate: the challenger against the champion on a day neither has seen.

Both versions are loaded as served (`load_served`) and scored on the same slice; `champion` moves
only if no gate metric is worse than the champion's by more than `gate.tolerance` and the
challenger's BN statistics check passes. The decision and its figures are written as tags on the
challenger's version, its evaluation on the slice as `gate/...` metrics of its run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from mtrec.config import GATE_METRICS, MtrecConfig
from mtrec.data.io import list_days
from mtrec.errors import GateDeferred, GateRefused
from mtrec.serving import ServedModel
from mtrec.tracking.client import CHALLENGER, CHAMPION, Tracker, VersionInfo
from mtrec.tracking.pyfunc import load_served

log = logging.getLogger(__name__)


@dataclass
class GateDecision:
    promoted: bool
    challenger: str
    champion: str | None
    slice: str | None
    reason: str
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {challenger, champion}
    bn: str = ""  # the challenger's BN check on the slice: passed | failed | no BN layers

    def tags(self) -> dict[str, str]:
        return {
            "mtrec.gate.decision": "promoted" if self.promoted else "refused",
            "mtrec.gate.reason": self.reason[:5000],
            "mtrec.gate.champion": self.champion or "",
            "mtrec.gate.slice": self.slice or "",
            "mtrec.gate.figures": json.dumps(self.figures)[:5000],
            "mtrec.gate.bn": self.bn,
        }


def compare(cfg: MtrecConfig, challenger: dict[str, float], champion: dict[str, float]) -> tuple[bool, list[str], dict]:
    """(passes, reasons, figures): each gate metric of the challenger against the champion's within
    `gate.tolerance`, in the metric's direction (higher AUC, lower NE, calibration nearer 1).

    Raises:
        GateDeferred: a gate metric is not a number on this slice (e.g. AUC of a day with one
            class): the slice cannot judge, which is "not yet", not "no".
        GateRefused: a gate metric is missing from the evaluation.
    """
    tol = cfg.gate.tolerance
    worse, figures = [], {}
    for m in cfg.gate_metrics():
        if m not in challenger or m not in champion:
            raise GateRefused(
                f"metric {m} is missing from the evaluation (computed: {', '.join(sorted(challenger))}); "
                "fix `gate.metrics`, or pass the model's own --config"
            )
        a, b = challenger[m], champion[m]
        figures[m] = {"challenger": a, "champion": b}
        if not (np.isfinite(a) and np.isfinite(b)):  # e.g. AUC of a slice with one class: cannot judge
            raise GateDeferred(
                f"{m} is not a number on this slice (challenger {a}, champion {b}; e.g. a day with one class): "
                "it cannot judge; run `mtrec promote` again once a later day's logs land"
            )
        sign = GATE_METRICS[m.partition("/")[2]]
        gap = (a - b) if sign > 0 else (b - a) if sign < 0 else (abs(b - 1) - abs(a - 1))  # > 0: challenger better
        if gap < -tol:
            worse.append(f"{m} {a:.4f} vs champion {b:.4f} (worse by {-gap:.4f} > tolerance {tol:g})")
    return not worse, worse, figures


def seen_until(v: VersionInfo) -> dt.date:
    """The last day whose data shaped the version: trained on, or its BN statistics recalibrated on."""
    recal = v.tags.get("mtrec.bn_recalibrated_on")
    return max(v.date, dt.date.fromisoformat(recal)) if recal else v.date


def gate_slice(cfg: MtrecConfig, *versions: VersionInfo) -> dt.date | None:
    """The newest day with logs that none of the versions has seen (`seen_until`)."""
    after = max(seen_until(v) for v in versions)
    days = [d for d in list_days(cfg.job.logs) if d > after]
    return days[-1] if days else None


def _bn_check(served: ServedModel, cfg: MtrecConfig, day: dt.date):
    """The gate's BN check of a served model on the slice under `cfg`'s logs and limits (None without BN layers)."""
    from mtrec import bn

    if not bn.bn_layers(served.model):
        return None
    rep = bn.check(served.model, served.spec, cfg.job.logs, day, cfg.bn)
    log.info("%s", rep.summary())
    return rep


def promote(cfg: MtrecConfig, version: str | None = None, day: dt.date | None = None) -> GateDecision:
    """The promotion gate: evaluate the challenger (`version`, default alias `challenger`) and the
    champion on the same unseen day with the served models, and move `champion` only if no gate
    metric is worse than the champion's by more than `gate.tolerance`. The decision and its
    figures are written as tags on the challenger's version.

    Raises:
        GateRefused: the challenger is worse (the reason names the metric and both values).
        GateDeferred: no day with logs yet that neither model trained on.
    """
    from mtrec.eval.evaluate import predict_day, read_truth, report

    tracker = Tracker(cfg)
    chal = tracker.version(version) if version else tracker.alias(CHALLENGER)
    if chal is None:
        raise GateRefused(
            f"{cfg.name} has no `challenger` version in {tracker.uri}; run a training job first or pass --version"
        )
    champ = tracker.alias(CHAMPION)
    if champ is not None and champ.version == chal.version:
        log.info("version %s is already the champion of %s", chal.version, cfg.name)
        return GateDecision(True, chal.version, champ.version, None, "already champion")
    if (
        champ is None
    ):  # the first champion: nothing to compare with, but its BN statistics are checked when a day allows
        decision = GateDecision(
            True, chal.version, None, None, f"no champion yet: version {chal.version} becomes the first"
        )
        first_day = day or gate_slice(cfg, chal)
        if first_day is not None:
            served = load_served(f"models:/{cfg.name}/{chal.version}")
            rep = _bn_check(served, cfg, first_day)
            if rep is not None:
                decision.bn, decision.slice = ("passed" if rep.passed else "failed"), first_day.isoformat()
                decision.promoted = rep.passed
                decision.reason = (
                    f"{decision.reason}; BN check passed on {first_day}"
                    if rep.passed
                    else f"no champion yet, but its {rep.summary()}"
                )
    else:
        day = day or gate_slice(cfg, chal, champ)
        seen = max(seen_until(chal), seen_until(champ))
        if day is None:
            raise GateDeferred(
                f"no day with logs after {seen} under {cfg.job.logs}: the gate compares both models "
                f"on a day neither has seen; run `mtrec promote` again once the next day's logs land"
            )
        if day <= seen:
            raise GateRefused(
                f"--date {day} is not after both models' data (challenger to {seen_until(chal)}, champion to "
                f"{seen_until(champ)}); pass a later day"
            )
        log.info(
            "gate: challenger v%s (trained to %s) vs champion v%s (trained to %s) on %s",
            chal.version,
            chal.date,
            champ.version,
            champ.date,
            day,
        )
        truth = read_truth(cfg.job.logs, day)
        scores, bn_report = {}, None
        for who, v in (("challenger", chal), ("champion", champ)):
            served = load_served(f"models:/{cfg.name}/{v.version}")
            # both on the same slice (this config's logs), each with its own spec
            scores[who] = report(served.spec, predict_day(served.model, served.spec, cfg.job.logs, day), truth)
            if who == "challenger":
                bn_report = _bn_check(served, cfg, day)
        if chal.run_id:  # the challenger's run gets its evaluation on the slice (a nightly for yesterday had none)
            tracker.log_metrics(
                chal.run_id,
                {f"gate/{k}": v for k, v in scores["challenger"].items()}
                | ({f"gate/{k}": v for k, v in bn_report.metrics().items()} if bn_report is not None else {}),
            )
            tracker.set_tags(chal.run_id, {"mtrec.gate_slice": day.isoformat()})
        ok, worse, figures = compare(cfg, scores["challenger"], scores["champion"])
        bn_failed = bn_report is not None and not bn_report.passed  # statistics that do not match what serving sees
        summary = "; ".join(f"{m} {f['challenger']:.4f} vs {f['champion']:.4f}" for m, f in figures.items())
        reasons = ([f"worse than champion v{champ.version} on {day}: " + "; ".join(worse)] if worse else []) + (
            [f"its {bn_report.summary()}"] if bn_failed else []
        )
        ok = ok and not bn_failed
        reason = (
            f"every gate metric within {cfg.gate.tolerance:g} of the champion or better on {day}: {summary}"
            + ("; BN check passed" if bn_report is not None else "")
            if ok
            else "; ".join(reasons)
        )
        decision = GateDecision(
            ok,
            chal.version,
            champ.version,
            day.isoformat(),
            reason,
            figures,
            bn="no BN layers" if bn_report is None else ("passed" if bn_report.passed else "failed"),
        )
    tracker.tag_version(chal.version, decision.tags())
    if not decision.promoted:
        stays = f"`champion` stays v{champ.version}" if champ is not None else "there is still no champion"
        raise GateRefused(f"challenger v{chal.version} of {cfg.name} refused: {decision.reason}; {stays}")
    tracker.call(
        "moving the champion alias", tracker.client.set_registered_model_alias, cfg.name, CHAMPION, chal.version
    )
    log.info("promoted v%s of %s to champion: %s", chal.version, cfg.name, decision.reason)
    return decision


def models_uri(cfg: MtrecConfig, alias: str = CHAMPION) -> str:
    return f"models:/{cfg.name}@{alias}"
