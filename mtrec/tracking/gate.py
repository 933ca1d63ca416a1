"""The promotion gate: the challenger against the champion on a day neither has seen (or the
`gate.days` newest such days, pooled into one slice).

Both versions are scored on the same slice as served: with `train.num_workers` > 1 by that many
Ray Train workers from their checkpoints, the tables sharded (`_score`), else loaded as served
(`load_served`) in this process; `champion` moves
only if no gate metric is worse than the champion's by more than `gate.tolerance`, the
challenger's BN statistics check passes, and the challenger meets the floors (`floors`: AUC above
`gate.min_auc`, calibration within `gate.max_calibration_factor`, a training loss that did not
climb), which the first champion, with nothing to compare with, must meet too. The decision and
its figures are written as tags on the challenger's version, its evaluation on the slice as
`gate/...` metrics of its run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from mtrec.config import GATE_METRICS, MtrecConfig
from mtrec.data.io import list_days
from mtrec.data.validate import day_rows
from mtrec.errors import GateDeferred, GateRefused, MtrecError, TrackingError
from mtrec.eval.metrics import auc_standard_error
from mtrec.serving import ServedModel
from mtrec.spec import LabelKind, ModelSpec
from mtrec.tracking.client import CHALLENGER, CHAMPION, Tracker, VersionInfo
from mtrec.tracking.pyfunc import load_served, without_pyfunc

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
        GateRefused: a gate metric is missing from the evaluation, whatever the others are (a
            metric no day will ever give is "no", never "not yet").
    """
    tol = cfg.gate.tolerance
    worse, figures = [], {}
    for m in cfg.gate_metrics():
        for who, scores in (("challenger", challenger), ("champion", champion)):
            if m not in scores:
                raise GateRefused(
                    f"metric {m} is missing from the {who}'s evaluation (computed: {', '.join(sorted(scores))}); "
                    "fix `gate.metrics`, or pass the model's own --config"
                )
    for m in cfg.gate_metrics():
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


AUC_LIKE = frozenset({"auc", "gauc", "auc_unbiased", "auc_entire_space", "macro_auc", "macro_auc_truth"})


def _counts(metrics: dict[str, float], metric: str) -> tuple[float, float]:
    """(positives, negatives) behind a gated metric: its own task's (or joint's) on the slice, 0s when
    the report does not say. A truth-based AUC (auc_unbiased, auc_entire_space, macro_auc_truth)
    weighs every row by its true probability, so the label counts over-state its error: the floor is
    then conservative."""
    task = metric.partition("/")[0]
    pos, rows = metrics.get(f"{task}/positives", 0.0), metrics.get(f"{task}/rows", 0.0)
    return pos, max(rows - pos, 0.0)


def floors(cfg: MtrecConfig, spec: ModelSpec, metrics: dict[str, float], train: dict[str, float]) -> list[str]:
    """Why a model may not be champion whatever it is compared with (empty: it may).

    - a gated AUC-like metric below `gate.min_auc`,
    - a gated root binary task's calibration outside [1/x, x] for x = `gate.max_calibration_factor`,
    - a training loss whose mean over the job's last tenth of batches exceeds `gate.max_loss_growth`
      x its mean over the first tenth (`train`: the checkpoint manifest's metrics).

    The slice's noise is allowed for: an AUC or a calibration refuses only when it lies beyond its
    floor by more than `gate.floor_z` standard errors (the AUC's from its positives and negatives,
    Hanley & McNeil; the calibration's from the Poisson error of the label sum, 1/sqrt(positives)),
    so a small slice cannot condemn a sound model, while a full day measures 0.48 against 0.52 to
    within ~0.01. A figure that is not a number on the slice is not judged here (`compare`, which
    the gate runs on every challenger, the first included, defers on it)."""
    g, out = cfg.gate, []
    gated = cfg.gate_metrics()

    def beyond(se: float, digits: int) -> tuple[float, str]:  # the slack a figure gets, and how a refusal says it
        if not g.floor_z or not se:
            return 0.0, ""
        return g.floor_z * se, f" by more than {g.floor_z:g} standard errors ({se:.{digits}f})"

    for m in gated:
        v = metrics.get(m)
        if m.partition("/")[2] not in AUC_LIKE or v is None or not np.isfinite(v):
            continue
        has_counts = f"{m.partition('/')[0]}/positives" in metrics
        slack, noise = beyond(auc_standard_error(v, *_counts(metrics, m)) if has_counts else 0.0, 4)
        if v + slack < g.min_auc:  # inf slack (no labelled positives): cannot be judged below
            out.append(f"{m} {v:.4f} is below the floor {g.min_auc:g} (gate.min_auc){noise}")
    roots = [t.name for t in spec.tasks if t.given is None and spec.label_kind(t) == LabelKind.BINARY]
    x = g.max_calibration_factor
    for task in (t for t in roots if any(m.partition("/")[0] == t for m in gated)):
        c, pos = metrics.get(f"{task}/calibration"), metrics.get(f"{task}/positives")
        if c is None or not np.isfinite(c):
            continue
        slack, noise = beyond(c / np.sqrt(pos) if pos else 0.0, 3)  # from the label sum's Poisson error
        if c - slack > x or c + slack < 1 / x:
            out.append(
                f"{task}/calibration {c:.3f} is outside [{1 / x:.3f}, {x:g}] (gate.max_calibration_factor){noise}"
            )
    first, last = train.get("train_loss_first_tenth"), train.get("train_loss_last_tenth")
    if first is not None and last is not None and not (np.isfinite(first) and np.isfinite(last)):
        out.append(f"its training loss is not a number (first tenth {first}, last tenth {last}): it diverged")
    elif first and last and last > g.max_loss_growth * first:
        out.append(
            f"its training loss rose from {first:.4f} (first tenth of the job's batches) to {last:.4f} (last "
            f"tenth), more than {g.max_loss_growth:g}x (gate.max_loss_growth): logs sorted by label, or a "
            "diverging learning rate"
        )
    return out


def _train_metrics(v: VersionInfo) -> dict[str, float]:
    """The version's checkpoint manifest's training metrics (empty when it cannot be read)."""
    from mtrec.train import checkpoint

    try:
        return dict(checkpoint.read_manifest(v.checkpoint).get("metrics") or {})
    except MtrecError as e:
        log.warning("the gate's loss floor is not checked: %s", e)
        return {}


def seen_until(v: VersionInfo) -> dt.date:
    """The last day whose data shaped the version: trained on, or its BN statistics recalibrated on."""
    recal = v.tags.get("mtrec.bn_recalibrated_on")
    return max(v.date, dt.date.fromisoformat(recal)) if recal else v.date


def read_as(spec: ModelSpec, cfg: MtrecConfig) -> ModelSpec:
    """A registered version's spec reading today's logs under the config's `columns:` (the log's
    names may have changed since it was trained: the mapping is outside the fingerprint)."""
    return spec.model_copy(update={"columns": cfg.spec.columns})


def gate_slice(cfg: MtrecConfig, *versions: VersionInfo, last: dt.date | None = None) -> list[dt.date]:
    """The gate's slice, oldest day first: the `gate.days` newest days with logs that none of the
    versions has seen (`seen_until`), which the gate scores as one; with `last` (`--date`), the
    newest such days up to `last`, `last` included.

    Raises:
        GateRefused: `last` is not after the versions' data.
        GateDeferred: fewer such days than `gate.days` have logs yet (a nightly's own version has
            none: the next night judges it).
    """
    after = max(seen_until(v) for v in versions)
    seen = ", ".join(f"v{v.version} to {seen_until(v)}" for v in versions)
    if last is not None and last <= after:
        raise GateRefused(f"--date {last} is not after the data the models have seen ({seen}); pass a later day")
    days = [d for d in list_days(cfg.job.logs) if after < d and (last is None or d < last)]
    days = [d for d in days if day_rows(cfg.job.logs, d) > 0]  # a folder with no rows is no day to judge on
    days = (days + ([last] if last is not None else []))[-cfg.gate.days :]
    if len(days) < cfg.gate.days:
        found = f"only {len(days)} day(s) ({slice_name(days)})" if days else "no day"
        up_to, then = (
            (f" up to --date {last}", "pass a later --date, or a lower gate.days")
            if last is not None
            else ("", "run `mtrec promote` again once the next day's logs land")
        )
        raise GateDeferred(
            f"{found} with logs after {after} under {cfg.job.logs}{up_to}, gate.days is {cfg.gate.days}: the gate "
            f"judges on days no model has seen ({seen}); {then}"
        )
    return days


def next_to_judge(
    cfg: MtrecConfig, versions: list[VersionInfo], champion: VersionInfo | None
) -> tuple[VersionInfo | None, list[VersionInfo]]:
    """(the version the gate judges next, the unjudged versions it skips), for `nightly --promote`.

    `versions` newest data first (`Tracker.versions`). The candidates are the versions newer than
    the champion and than every version the gate judged (a `mtrec.gate.decision` tag): older ones
    are superseded. Of them, the newest that has `gate.days` days with logs after its and the
    champion's data (`gate_slice` would not defer) is judged; the newer ones wait for their days,
    the older ones are skipped. With none ready, the newest candidate (the challenger), whose gate
    then defers; (None, []) when there is no candidate.
    """
    candidates = []
    for v in versions:
        if "mtrec.gate.decision" in v.tags or (champion is not None and v.version == champion.version):
            break
        candidates.append(v)
    for i, v in enumerate(candidates):
        try:
            gate_slice(cfg, v, *([champion] if champion is not None else []))
        except GateDeferred:
            continue
        return v, candidates[i + 1 :]
    return (candidates[0], []) if candidates else (None, [])


def slice_name(days: list[dt.date]) -> str:
    """A slice as the tags and messages name it: its days, comma-separated ("2026-01-04" for one)."""
    return ",".join(d.isoformat() for d in days)


def _bn_check(served: ServedModel, cfg: MtrecConfig, day: dt.date):
    """The gate's BN check of a served model on the slice under `cfg`'s logs and limits (None without BN
    layers): against the slice's candidates when `job.serving_logs` is set (deferred while they are
    not there), its impressions otherwise."""
    from mtrec import bn

    if not bn.bn_layers(served.model):
        return None
    serving = cfg.job.serving_logs
    if serving is not None:
        _defer_without_serving_logs(serving, day)
    rep = bn.check(served.model, read_as(served.spec, cfg), cfg.job.logs, day, cfg.bn, serving)
    log.info("%s", rep.summary())
    return rep


def version_config(cfg: MtrecConfig, url: str) -> MtrecConfig | None:
    """`cfg` with the model spec and training-time sampling (its score offsets) of the checkpoint at
    `url`, reading today's logs under `cfg`'s `columns:` (`read_as`): what its workers build to
    score it sharded. None when its manifest does not tell the offsets apart (scored as served)."""
    from mtrec.config import parse_config
    from mtrec.spec import SPEC_KEYS
    from mtrec.train import checkpoint

    manifest = checkpoint.read_manifest(url)
    spec, offsets = checkpoint.trained_spec(manifest, url)
    data = cfg.model_dump(mode="json")
    data.update({k: v for k, v in read_as(spec, cfg).model_dump(mode="json").items() if k in SPEC_KEYS})
    sampling = ((manifest.get("config") or {}).get("train") or {}).get("sampling")
    if sampling is not None:
        data["train"]["sampling"] = sampling
    vcfg = parse_config(data, label=f"{url} manifest")
    return vcfg if vcfg.score_offsets() == offsets else None


def version_bn_stats(cfg: MtrecConfig, v: VersionInfo) -> dict | None:
    """The BN statistics of a version recalibrated after its checkpoint (`mtrec bn-check
    --recalibrate`: its run's `bn/running_stats.json`), which its workers apply over the
    checkpoint's so that they score the model the version serves; None for any other version.

    Raises:
        TrackingError: the version says it was recalibrated but its run lacks the statistics.
    """
    import json
    import tempfile

    if "mtrec.bn_recalibrated_on" not in v.tags:
        return None
    tracker = Tracker(cfg)
    path = "bn/running_stats.json"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = tracker.call("reading its BN statistics", tracker.client.download_artifacts, v.run_id, path, tmp)
        except TrackingError as e:
            raise TrackingError(
                f"version {v.version} of {cfg.name} was recalibrated but its statistics could not be read: {e}"
            ) from None
        with open(local) as f:
            return json.load(f)


def _score(
    cfg: MtrecConfig, v: VersionInfo, days: list[dt.date], bn_check: bool, address: str | None
) -> tuple[dict, ModelSpec, object]:
    """(metrics of version `v` on `days` pooled, its spec, its BN check on the last day or None):
    with `train.num_workers` > 1, or for a version registered without a pyfunc (above
    `tracking.max_pyfunc_mb`), by `train.num_workers` Ray Train workers from its checkpoint, the
    tables sharded (`mtrec.jobs.evaluate.score_checkpoint`, on the Ray cluster at `address`);
    else its served model in this process."""
    no_pyfunc = without_pyfunc(v.tags)
    vcfg = version_config(cfg, v.checkpoint) if (cfg.train.num_workers > 1 or no_pyfunc) and v.checkpoint else None
    if vcfg is None and no_pyfunc:
        raise MtrecError(
            f"version {v.version} of {cfg.name} has no pyfunc, and its checkpoint {v.checkpoint or '(none)'} "
            "does not say its sampling offsets: workers cannot build its model; retrain the day with --force"
        )
    if vcfg is None:
        from mtrec.eval.evaluate import evaluate_days

        served = load_served(f"models:/{cfg.name}/{v.version}")
        scores = evaluate_days(served.model, read_as(served.spec, cfg), cfg.job.logs, days)
        return scores, served.spec, _bn_check(served, cfg, days[-1]) if bn_check else None
    from mtrec import bn
    from mtrec.jobs.evaluate import score_checkpoint
    from mtrec.models import build_model

    serving = cfg.job.serving_logs
    if bn_check and serving is not None and bn.bn_layers(build_model(vcfg.spec, "meta")):
        _defer_without_serving_logs(serving, days[-1])
    scores, figures, _ = score_checkpoint(vcfg, days, v.checkpoint, address, bn_check, version_bn_stats(cfg, v))
    rep = figures["bn"] if bn_check else None
    if rep is not None:
        log.info("%s", rep.summary())
    return scores, vcfg.spec.serving(), rep


def _defer_without_serving_logs(serving: str, day: dt.date) -> None:
    from mtrec import bn

    if not bn.has_serving_logs(serving, day):
        raise GateDeferred(
            f"no serving logs for {day} under {serving} (job.serving_logs) to check the BN statistics against; "
            "run `mtrec promote` again once that day's candidates are logged"
        )


def promote(
    cfg: MtrecConfig, version: str | None = None, day: dt.date | None = None, address: str | None = None
) -> GateDecision:
    """The promotion gate: evaluate the challenger (`version`, default alias `challenger`) and the
    champion on the same unseen slice (`gate_slice`; `day`: its last day) with the served models,
    and move `champion` only if no gate metric is worse than the champion's by more than
    `gate.tolerance`. The decision and its figures are written as tags on the challenger's version.
    `address`: the Ray cluster the scoring joins when it runs on workers (`train.num_workers` > 1,
    or a version without a pyfunc).

    Raises:
        GateRefused: the challenger is worse (the reason names the metric and both values).
        GateDeferred: not yet: fewer than `gate.days` days with logs that neither model trained on,
            or a gate metric that is not a number on the slice (one class).
    """
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
    if champ is None:  # the first champion: nothing to compare with, but the floors and its BN statistics
        days = gate_slice(cfg, chal, last=day)  # the floors, on days it has not seen
        scores, chal_spec, rep = _score(cfg, chal, days, True, address)
        if chal.run_id:
            tracker.log_metrics(chal.run_id, {f"gate/{k}": v for k, v in scores.items()})
        compare(
            cfg, scores, scores
        )  # a gated metric missing (refused) or not a number (deferred), as for any challenger
        below = floors(cfg, chal_spec, scores, _train_metrics(chal))
        reasons = below + ([f"its {rep.summary()}"] if rep is not None and not rep.passed else [])
        shown = "; ".join(f"{m} {scores[m]:.4f}" for m in cfg.gate_metrics() if m in scores)
        decision = GateDecision(
            not reasons,
            chal.version,
            None,
            slice_name(days),
            f"no champion yet: version {chal.version} becomes the first, meeting the floors on {slice_name(days)} "
            f"({shown})" + (f"; BN check passed against the {rep.population}" if rep is not None else "")
            if not reasons
            else "no champion yet, but " + "; ".join(reasons),
            {m: {"challenger": scores[m]} for m in cfg.gate_metrics() if m in scores},
            bn="no BN layers" if rep is None else ("passed" if rep.passed else "failed"),
        )
    else:
        days = gate_slice(cfg, chal, champ, last=day)
        on = slice_name(days)
        log.info(
            "gate: challenger v%s (trained to %s) vs champion v%s (trained to %s) on %s",
            chal.version,
            chal.date,
            champ.version,
            champ.date,
            on,
        )
        scores, bn_report = {}, None
        for who, v in (("challenger", chal), ("champion", champ)):
            # both on the same slice (this config's logs), each with its own spec; the challenger's BN check on
            # the slice's newest day: what serving sees now
            scores[who], spec, rep = _score(cfg, v, days, who == "challenger", address)
            if who == "challenger":
                bn_report, served_spec = rep, spec
        if chal.run_id:  # the challenger's run gets its evaluation on the slice (a nightly for yesterday had none)
            tracker.log_metrics(
                chal.run_id,
                {f"gate/{k}": v for k, v in scores["challenger"].items()}
                | ({f"gate/{k}": v for k, v in bn_report.metrics().items()} if bn_report is not None else {}),
            )
            tracker.set_tags(chal.run_id, {"mtrec.gate_slice": on})
        ok, worse, figures = compare(cfg, scores["challenger"], scores["champion"])
        bn_failed = bn_report is not None and not bn_report.passed  # statistics that do not match what serving sees
        below = floors(cfg, served_spec, scores["challenger"], _train_metrics(chal))
        summary = "; ".join(f"{m} {f['challenger']:.4f} vs {f['champion']:.4f}" for m, f in figures.items())
        reasons = (
            ([f"worse than champion v{champ.version} on {on}: " + "; ".join(worse)] if worse else [])
            + below
            + ([f"its {bn_report.summary()}"] if bn_failed else [])
        )
        ok = ok and not bn_failed and not below
        reason = (
            f"every gate metric within {cfg.gate.tolerance:g} of the champion or better on {on}: {summary}"
            + (f"; BN check passed against the {bn_report.population}" if bn_report is not None else "")
            if ok
            else "; ".join(reasons)
        )
        decision = GateDecision(
            ok,
            chal.version,
            champ.version,
            on,
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
