"""A synthetic multi-day world with known ground truth, written in the data contract's format.

The generative model (docs/synthetic-world.md states it in full):

* users and items carry latent vectors; observable categorical features (segment, age bucket,
  category, brand, shop, price bucket, multi-hot tags) are noisy functions of those latents;
* each request shows ``positions`` items, the top of ``candidates`` ranked by a noisy logging
  policy that also promotes some items regardless of relevance; clicks follow a position-based
  model ``p(click) = p(examined | position, device) x p(relevant | user, item)``;
* after a click the user takes the deterministic action (``daction``: add-to-cart / wishlist) or
  another action (``oaction``), then buys with a probability much higher after ``daction``;
  conversion is driven by an affinity that is *negatively* correlated with the click affinity
  (and by price, which does not affect clicks), so CVR learned on clicked rows only is biased;
* watch time (regression) follows a third affinity, also anti-correlated with clicks, so the
  tasks conflict;
* every day item latents and popularity drift and new users and items arrive;
* optionally (`history`, `intent_*`; preset ``sequences``) users carry their earlier behaviours
  (written as ``hist_*`` list columns, oldest first) and a short-term intent category that raises
  the click and buy probabilities of its items and changes from request to request.

The truth table beside each day (``<out>/_truth/dt=D/``, keyed by ``row_id``) holds every row's
examination probability, unbiased click probability, CVR given click, CTCVR, ... Training never
reads it (the leading underscore also hides it from Hive-style partition discovery).

Example:
    >>> summary = write_world("memory://w", days=2, rows_per_day=10_000, seed=7)
    >>> summary.rows
    [10000, 10000]
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrec.data.io import day_url, filesystem, join
from mtrec.errors import MtrecError

log = logging.getLogger(__name__)

TRUTH_DIR = "_truth"
WORLD_FILE = "_world.json"
USER_ID_BASE = 1_000_000_000  # ids are large, sparse int64s as in real logs
ITEM_ID_BASE = 5_000_000_000


@dataclass(frozen=True)
class WorldParams:
    """Parameters of the generative model (defaults give CTR ~5%, CVR ~6%, CTCVR ~0.3%)."""

    users: int = 20_000  # users on day 1
    items: int = 5_000  # items on day 1
    new_users_per_day: float = 0.03  # fraction of the current population added each day
    new_items_per_day: float = 0.05
    latent_dim: int = 4
    positions: int = 10  # slots per request (K)
    candidates: int = 30  # items the logging policy ranks per request
    policy_noise: float = 1.0  # std of the logging policy's error on the relevance logit
    policy_boost: float = 1.0  # std of a per-item promotion the policy adds (not relevance)
    exam_power: float = 0.9  # p(examined | position k) = 1 / (1 + k) ** exam_power ...
    device_exam: tuple[float, ...] = (1.0, 0.7)  # ... x this factor per device (0 = app, 1 = web)
    web_share: float = 0.3
    click_bias: float = -3.5  # relevance logit = click_bias + click_scale * affinity + popularity
    click_scale: float = 1.2
    popularity_std: float = 0.6
    rho_conversion: float = -0.8  # corr(click affinity, conversion affinity): clickbait converts less
    rho_watch: float = -0.6  # corr(click affinity, watch affinity): tasks conflict
    daction_bias: float = -1.0  # logit of p(daction | click)
    daction_scale: float = 0.8
    buy_bias: float = -2.2  # logit of p(buy | click), before the action effect
    buy_scale: float = 1.0
    buy_after_daction: float = 2.0  # added to the buy logit after a daction ...
    buy_after_oaction: float = -1.5  # ... or after an oaction: p(buy | daction) >> p(buy | oaction)
    price_effect: float = -0.6  # per std of log price, on the buy logit only
    appeal_std: float = 0.0  # std of an item-level term on the click logit that no feature shows (0: none)
    quality_std: float = 0.0  # std of an item-level term on the buy logit that no feature shows (0: none)
    rho_quality: float = 0.0  # corr(quality, appeal): well-made items are also clicked more
    watch_log_mean: float = 3.4  # log seconds
    watch_scale: float = 0.5
    watch_noise: float = 0.6
    drift: float = 0.08  # daily random-walk step of item latents and popularity (user taste: half)
    segments: int = 50
    age_buckets: int = 8
    categories: int = 100
    brands: int = 1000
    shops: int = 3000
    price_buckets: int = 10
    tags: int = 300
    feature_noise: float = 0.5  # noise on the latents before observable features are derived
    # behaviour sequences and short-term intent (all off by default; docs/synthetic-world.md, preset sequences)
    history: int = 0  # behaviours kept per user and written as the hist_* list columns (0: no columns)
    history_init: int = 0  # mean length of the past a user arrives with (behaviours, uniform in +-50%)
    history_gap_hours: float = 24.0  # mean time between those past requests at activity 1 (it scales as 1 / activity)
    intent_strength: float = 0.0  # on the relevance logit when the item's category is the user's intent
    intent_buy: float = 0.0  # on the buy logit, likewise
    intent_stickiness: float = 0.8  # p(the intent carries over to the user's next request)
    intent_candidates: int = 0  # of the `candidates`, how many are retrieved from the intent category
    # purchasing power (off by default; preset purchasing_power): a user latent that tilts clicks and
    # buys towards dearer items, logged as a user-level class label `power_level` (0 = lowest)
    power_levels: int = 0  # classes of the logged label (0: no label column)
    power_effect: float = 0.0  # on the relevance and buy logits, per std of power x std of log price
    power_noise: float = 0.5  # std of the noise on the latent before it is cut into levels
    # an intra-day cycle (off by default; preset day_cycle): who is active and what is shown moves with
    # the hour. A user's request rate at time of day t (in days) is scaled by
    # exp(s cos 2pi(t - phase of their segment) + s cos 2pi(t - phase of their device)), an item's
    # draw as a candidate by exp(s cos 2pi(t - phase of its category)), s = cycle_strength
    cycle_strength: float = 0.0
    web_peak_hour: float = 12.0  # the device phases: web traffic peaks at noon ...
    app_peak_hour: float = 21.0  # ... app traffic in the evening

    def examination(self) -> np.ndarray:
        """p(examined | position) on device 0, shape K."""
        return 1.0 / (1.0 + np.arange(self.positions)) ** self.exam_power

    def has_intent(self) -> bool:
        """Whether users carry a short-term intent (something depends on it)."""
        return self.intent_strength > 0 or self.intent_buy != 0 or self.intent_candidates > 0


# Named variants of the default world (`mtrec synth --preset NAME`); docs/synthetic-world.md.
PRESETS: dict[str, dict[str, float]] = {
    # items differ in an appeal (click logit) and a quality (buy logit) that no feature shows and
    # that go together (good items are clicked and bought more); the biases are lowered so that CTR
    # and CVR given click stay near the default world's (5.5% and 6.9% vs 5.3% and 6.0%, seed 0).
    # The model comparison's world.
    "item_quality": {"appeal_std": 1.0, "quality_std": 1.2, "rho_quality": 0.8, "click_bias": -4.1, "buy_bias": -3.6},
    # users carry their last 64 behaviours (hist_* columns; they arrive with 20-60) and a short-term
    # intent category that moves the relevance logit by 1.5 and the buy logit by 1; twice the users,
    # so that a user id is seen less often than their history; click_bias lowered to keep CTR near 5%
    "sequences": {
        "users": 40_000,
        "history": 64,
        "history_init": 40,
        "intent_strength": 1.5,
        "intent_buy": 1.0,
        "intent_stickiness": 0.85,
        "click_bias": -3.9,
    },
}
# the sequences world where users also differ in purchasing power, which tilts their clicks and buys
# towards dearer items (so their history shows it) and is logged as a 7-level label (DUPN's PPP task)
PRESETS["purchasing_power"] = {**PRESETS["sequences"], "power_levels": 7, "power_effect": 0.6}
# logs in time order with an intra-day cycle: each segment of users and each category of items has
# its hour, web traffic peaks at noon and app traffic in the evening; written hour by hour (24 files
# a day). The world for row order and BN statistics (docs/bn-consistency.md).
PRESETS["day_cycle"] = {"cycle_strength": 1.5}


_PARSE = {
    "int": (int, "an integer"),
    "float": (float, "a number"),
    "tuple[float, ...]": (lambda text: tuple(float(x) for x in text.split(",")), "comma-separated numbers"),
}


def world_params(overrides: list[str], preset: str | None = None, flag: str = "--param") -> WorldParams:
    """`WorldParams` from a preset (or the defaults) with ``NAME=VALUE`` overrides on top (as
    `mtrec synth --preset P --param NAME=VALUE` takes them), checked (`check_params`). `flag` names
    the option in error messages."""
    fields = {f.name: f.type for f in dataclasses.fields(WorldParams)}
    if preset is not None and preset not in PRESETS:
        raise MtrecError(
            f"--preset {preset!r}: unknown; choose one of {', '.join(PRESETS)} or leave it out for the default world"
        )
    values: dict[str, object] = dict(PRESETS[preset]) if preset else {}
    for kv in overrides:
        name, sep, text = kv.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise MtrecError(f"{flag} {kv!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        parse, what = _PARSE[fields[name]]  # a field of another type must be added to _PARSE first
        try:
            values[name] = parse(text)
        except ValueError:
            raise MtrecError(f"{flag} {kv!r}: {name} takes {what}") from None
    params = WorldParams(**values)
    problem = check_params(params)
    if problem:
        raise MtrecError(f"{flag} {problem}")
    return params


def check_params(p: WorldParams) -> str | None:
    """What makes `p` not a world (``NAME=VALUE: why``), or None."""
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        for x in v if isinstance(v, tuple) else (v,):
            if not math.isfinite(x):
                return f"{f.name}={v}: must be a finite number"
    counts = (
        "users",
        "items",
        "latent_dim",
        "positions",
        "candidates",
        "segments",
        "age_buckets",
        "categories",
        "brands",
        "shops",
        "price_buckets",
        "tags",
    )
    for name in counts:
        if getattr(p, name) < 1:
            return f"{name}={getattr(p, name)}: must be >= 1"
    for name in ("history", "history_init", "intent_candidates", "power_levels"):
        if getattr(p, name) < 0:
            return f"{name}={getattr(p, name)}: must be >= 0"
    if p.history_init + p.history_init // 2 > p.history:
        return (
            f"history_init={p.history_init}: a user's initial past (up to 1.5 x history_init behaviours) "
            f"must fit in history ({p.history})"
        )
    if p.intent_candidates > p.candidates:
        return f"intent_candidates={p.intent_candidates}: must be <= candidates ({p.candidates})"
    if p.power_levels == 1:
        return "power_levels=1: a label needs >= 2 levels (0: none)"
    for name in ("web_peak_hour", "app_peak_hour"):
        if not 0.0 <= getattr(p, name) < 24.0:
            return f"{name}={getattr(p, name)}: an hour of the day lies in [0, 24)"
    if p.history_gap_hours <= 0:
        return f"history_gap_hours={p.history_gap_hours}: must be > 0"
    if p.candidates < p.positions:
        return (
            f"candidates={p.candidates}: must be >= positions ({p.positions}): "
            "the policy shows the top `positions` of them"
        )
    if len(p.device_exam) != 2 or min(p.device_exam) <= 0:
        return f"device_exam={','.join(map(str, p.device_exam))}: needs 2 positive factors (app, web)"
    for name in ("rho_conversion", "rho_watch", "rho_quality"):
        if not -1.0 <= getattr(p, name) <= 1.0:
            return f"{name}={getattr(p, name)}: a correlation must lie in [-1, 1]"
    for name in ("web_share", "new_users_per_day", "new_items_per_day", "intent_stickiness"):
        if not 0.0 <= getattr(p, name) <= 1.0:
            return f"{name}={getattr(p, name)}: a share must lie in [0, 1]"
    for name in (
        "policy_noise",
        "policy_boost",
        "popularity_std",
        "appeal_std",
        "quality_std",
        "watch_noise",
        "drift",
        "feature_noise",
        "exam_power",
        "intent_strength",
        "power_noise",
        "cycle_strength",
    ):
        if getattr(p, name) < 0:
            return f"{name}={getattr(p, name)}: must be >= 0"
    return None


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _mix(rng: np.random.Generator, base: np.ndarray, rho: float) -> np.ndarray:
    """A latent with correlation `rho` to `base` (both unit-variance per dimension)."""
    return rho * base + math.sqrt(1.0 - rho * rho) * rng.standard_normal(base.shape, dtype=np.float32)


class _Population:
    """Growable arrays of per-entity attributes (users or items)."""

    def __init__(self) -> None:
        self.cols: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(next(iter(self.cols.values()))) if self.cols else 0

    def add(self, **cols: np.ndarray) -> None:
        for k, v in cols.items():
            self.cols[k] = np.concatenate([self.cols[k], v]) if k in self.cols else v

    def __getitem__(self, k: str) -> np.ndarray:
        return self.cols[k]


class World:
    """The evolving world. State (latents, popularity, new ids) advances one day at a time from
    one RNG; each day's traffic draws from its own RNG seeded by (seed, day, file), so a day's
    logs do not depend on how many days are written after it.

    With `WorldParams.history` or an intent on, the world also carries each user's current intent
    and last `history` behaviours (oldest first), which every file of traffic reads and extends:
    files must then be generated in time order, as `write_world` does. Everything these features
    draw comes from streams of their own, so the worlds without them are unchanged.

    Args:
        params (WorldParams): the generative model.
        seed (int): everything is deterministic for a seed.
    """

    def __init__(self, params: WorldParams, seed: int):
        self.p = params
        self.seed = seed
        self.rng = np.random.default_rng([seed, 0])
        d = params.latent_dim
        r = self.rng
        # fixed projections from latents to observable categorical features
        self.proj = {
            "segment": r.standard_normal((d, params.segments), dtype=np.float32),
            "category": r.standard_normal((d, params.categories), dtype=np.float32),
            "brand": r.standard_normal((d, params.brands), dtype=np.float32),
            "shop": r.standard_normal((d, params.shops), dtype=np.float32),
            "tags": r.standard_normal((d, params.tags), dtype=np.float32),
        }
        # the intra-day cycle's phases (fractions of a day) per segment and category: a stream of
        # their own, so that the world without the cycle is unchanged
        rc = np.random.default_rng([seed, 6])
        self.segment_phase = rc.random(params.segments)
        self.category_phase = rc.random(params.categories)
        self.users = _Population()
        self.items = _Population()
        # per user: current intent category; last `history` behaviours, left-aligned, oldest first
        # (item index, type 1 click / 2 cart / 3 buy, device, time in seconds since day 1 began)
        self.intent = np.zeros(0, np.int64)
        H = params.history
        self.h_item = np.zeros((0, H), np.int64)
        self.h_type = np.zeros((0, H), np.int8)
        self.h_dev = np.zeros((0, H), np.int8)
        self.h_time = np.zeros((0, H), np.float64)
        self.h_len = np.zeros(0, np.int64)
        self._new_users(params.users)
        self._new_items(params.items)
        self._arrive(0, params.users, 0.0)  # needs the items: their past was spent among them
        self.day_index = 0
        # entities at or past these indices arrived today (none on day 1)
        self.first_new_user, self.first_new_item = len(self.users), len(self.items)

    # ---- population ------------------------------------------------------------------------------
    def _noisy(self, x: np.ndarray) -> np.ndarray:
        return x + self.p.feature_noise * self.rng.standard_normal(x.shape, dtype=np.float32)

    def _new_users(self, n: int) -> None:
        p, r = self.p, self.rng
        start = len(self.users)
        taste = r.standard_normal((n, p.latent_dim), dtype=np.float32)
        activity = r.lognormal(0.0, 1.0, n).astype(np.float32)  # requests per day, relative
        age = np.digitize(self._noisy(taste[:, :1])[:, 0], np.linspace(-1.5, 1.5, p.age_buckets - 1))
        self.users.add(
            id=USER_ID_BASE + np.arange(start, start + n, dtype=np.int64) * 7919,
            taste=taste,
            activity=activity,
            segment=np.argmax(self._noisy(taste) @ self.proj["segment"], axis=1).astype(np.int64),
            age=age.astype(np.int64),
            web=(r.random(n) < p.web_share),
            **self._power(start, n),
        )

    def _power(self, start: int, n: int) -> dict[str, np.ndarray]:
        """Purchasing power: the latent `power` (N(0, 1)), the logged level (the latent plus noise
        of std `power_noise`, cut at the quantiles that make the levels equally likely) and the
        true probability of each level given the latent (`power_p`, n x levels). A stream of its
        own, so that worlds without it are unchanged."""
        p = self.p
        z = np.random.default_rng([self.seed, 5, start]).standard_normal((2, n))
        power = z[0].astype(np.float32)
        levels = max(p.power_levels, 1)
        sigma = max(p.power_noise, 1e-6)
        total = NormalDist(0.0, math.sqrt(1.0 + sigma**2))
        cuts = np.array([total.inv_cdf(k / levels) for k in range(1, levels)])
        level = np.searchsorted(cuts, z[0] + p.power_noise * z[1])
        edges = np.concatenate([[-np.inf], cuts, [np.inf]])
        cdf = _normal_cdf((edges[None, :] - z[0][:, None]) / sigma)  # n x (levels + 1)
        return {"power": power, "power_level": level.astype(np.int64), "power_p": np.diff(cdf, axis=1)}

    def _new_items(self, n: int) -> None:
        p, r = self.p, self.rng
        start = len(self.items)
        click_lat = r.standard_normal((n, p.latent_dim), dtype=np.float32)
        conv_lat = _mix(r, click_lat, p.rho_conversion)
        watch_lat = _mix(r, click_lat, p.rho_watch)
        log_price = r.normal(3.0, 1.0, n).astype(np.float32)
        scores = self._noisy(click_lat) @ self.proj["tags"]
        k = r.integers(1, 5, n)  # 1..4 tags per item
        top = np.argsort(-scores, axis=1)[:, :4]
        tag_mask = np.arange(4)[None, :] < k[:, None]
        self.items.add(
            id=ITEM_ID_BASE + np.arange(start, start + n, dtype=np.int64) * 104729,
            click_lat=click_lat,
            conv_lat=conv_lat,
            watch_lat=watch_lat,
            popularity=(p.popularity_std * r.standard_normal(n)).astype(np.float32),
            # appeal and quality draw from their own stream, so that worlds without them are the same
            **self._appeal_quality(start, n),
            boost=(p.policy_boost * r.standard_normal(n)).astype(np.float32),
            log_price=log_price,
            category=np.argmax(self._noisy(click_lat) @ self.proj["category"], axis=1).astype(np.int64),
            brand=np.argmax(self._noisy(conv_lat) @ self.proj["brand"], axis=1).astype(np.int64),
            shop=np.argmax(self._noisy(watch_lat) @ self.proj["shop"], axis=1).astype(np.int64),
            price_bucket=np.clip(np.floor((log_price - 0.5) / 5.0 * p.price_buckets), 0, p.price_buckets - 1).astype(
                np.int64
            ),
            tags=top.astype(np.int64),
            tag_mask=tag_mask,
        )

    def advance(self) -> None:
        """One day passes: latents and popularity drift, new users and items arrive."""
        p, r = self.p, self.rng
        it, us = self.items.cols, self.users.cols
        for key in ("click_lat", "conv_lat", "watch_lat"):
            it[key] = (it[key] + p.drift * r.standard_normal(it[key].shape, dtype=np.float32)) / math.sqrt(
                1 + p.drift**2
            )
        it["popularity"] = it["popularity"] + p.drift * p.popularity_std * r.standard_normal(len(self.items)).astype(
            np.float32
        )
        us["taste"] = (
            us["taste"] + 0.5 * p.drift * r.standard_normal(us["taste"].shape, dtype=np.float32)
        ) / math.sqrt(1 + (0.5 * p.drift) ** 2)
        self.first_new_user, self.first_new_item = len(self.users), len(self.items)
        n_users = max(1, round(p.new_users_per_day * len(self.users)))
        self._new_users(n_users)
        self._arrive(self.first_new_user, n_users, (self.day_index + 1) * 86_400.0)  # among yesterday's items
        self._new_items(max(1, round(p.new_items_per_day * len(self.items))))
        self.day_index += 1

    def _appeal_quality(self, start: int, n: int) -> dict[str, np.ndarray]:
        """Unobserved item-level terms: `appeal` on the click logit, `quality` on the buy logit,
        correlated `rho_quality`."""
        p = self.p
        z = np.random.default_rng([self.seed, 2, start]).standard_normal((2, n), dtype=np.float32)
        q = p.rho_quality * z[0] + math.sqrt(1.0 - p.rho_quality**2) * z[1]
        return {"appeal": p.appeal_std * z[0], "quality": p.quality_std * q}

    # ---- intent and history ----------------------------------------------------------------------
    def _intent_p(self) -> np.ndarray:
        """Where a fresh intent falls: categories in proportion to their items' popularity mass (the
        categories candidates come from), so no user's intent is predictable from the user."""
        it = self.items.cols
        w = np.bincount(
            it["category"], weights=np.exp(it["popularity"].astype(np.float64)), minlength=self.p.categories
        )
        return w / w.sum()

    def _next_intent(self, current: np.ndarray, r: np.random.Generator) -> np.ndarray:
        """One step of the intent process for requests of distinct users: the intent carries over
        with probability `intent_stickiness`, else it is drawn afresh."""
        keep = r.random(len(current)) < self.p.intent_stickiness
        fresh = r.choice(self.p.categories, size=len(current), p=self._intent_p())
        return np.where(keep, current, fresh)

    def _request_intents(self, uidx: np.ndarray, r: np.random.Generator) -> np.ndarray:
        """The intent at each request (requests in time order, users may repeat), from the users'
        current intents, which are then left at their last request's."""
        n = len(uidx)
        keep = r.random(n) < self.p.intent_stickiness
        fresh = r.choice(self.p.categories, size=n, p=self._intent_p())
        # per user, in time order: the intent is the fresh draw of the latest request that redrew
        # it (at or before this one), else the user's intent before this file
        order = np.argsort(uidx, kind="stable")
        us = uidx[order]
        i = np.arange(n)
        first = np.ones(n, bool)
        first[1:] = us[1:] != us[:-1]
        group_start = np.maximum.accumulate(np.where(first, i, 0))
        last_redraw = np.maximum.accumulate(np.where(keep[order], -1, i))
        redrawn = last_redraw >= group_start
        got = np.where(redrawn, fresh[order][np.maximum(last_redraw, 0)], self.intent[us])
        intent = np.empty(n, np.int64)
        intent[order] = got
        last = np.ones(n, bool)
        last[:-1] = us[1:] != us[:-1]
        self.intent[us[last]] = got[last]
        return intent

    def _in_category(self, cats: np.ndarray, m: int, r: np.random.Generator) -> np.ndarray:
        """`m` items per entry of `cats`, drawn by popularity within that category (len(cats) x m)."""
        it = self.items.cols
        n_cat = self.p.categories
        w = np.exp(it["popularity"].astype(np.float64))
        order = np.argsort(it["category"], kind="stable")
        cum = np.cumsum(w[order])
        count = np.bincount(it["category"], minlength=n_cat)
        first = np.concatenate([[0], np.cumsum(count)[:-1]])
        mass = np.bincount(it["category"], weights=w, minlength=n_cat)
        before = np.concatenate([[0.0], cum])[first]
        u = before[cats][:, None] + r.random((len(cats), m)) * mass[cats][:, None]
        idx = np.searchsorted(cum, u, side="right")
        lo = first[cats][:, None]
        # rounding can step over a category's edge; intents only fall on categories with items
        return order[np.clip(idx, lo, lo + np.maximum(count[cats][:, None], 1) - 1)]

    def _arrive(self, start: int, n: int, t0: float) -> None:
        """Users start..start+n arrive at time `t0` (seconds since day 1 began) with an intent and
        a past of `history_init` behaviours on average: their requests before `t0`, simulated
        with the traffic's own model from a stationary intent process, ending at the intent they
        arrive with. Everything is drawn from a stream of (seed, 3, start)."""
        p = self.p
        if not (p.history or p.has_intent()):
            return
        r = np.random.default_rng([self.seed, 3, start])
        intent = r.choice(p.categories, size=n, p=self._intent_p()) if p.has_intent() else np.zeros(n, np.int64)
        H = p.history
        self.h_item = np.concatenate([self.h_item, np.zeros((n, H), np.int64)])
        self.h_type = np.concatenate([self.h_type, np.zeros((n, H), np.int8)])
        self.h_dev = np.concatenate([self.h_dev, np.zeros((n, H), np.int8)])
        self.h_time = np.concatenate([self.h_time, np.zeros((n, H), np.float64)])
        self.h_len = np.concatenate([self.h_len, np.zeros(n, np.int64)])
        if H and p.history_init:
            self._past(start, n, intent, t0, r)
        self.intent = np.concatenate([self.intent, intent])

    def _past(self, start: int, n: int, intent: np.ndarray, t0: float, r: np.random.Generator) -> None:
        """Simulate requests of users start..start+n, one round at a time (one request per user
        still short of their target), until each has its target number of behaviours; keep the
        newest `target` and date the requests back from `t0` by exponential gaps of mean
        `history_gap_hours / activity`."""
        p, K = self.p, self.p.positions
        init = p.history_init
        target = r.integers(init - init // 2, init + init // 2 + 1, n)
        got = np.zeros(n, np.int64)
        rounds = np.zeros(n, np.int64)
        ev: list[tuple[np.ndarray, ...]] = []
        active = np.flatnonzero(target > 0)
        by_popularity = _Alias(np.exp(self.items["popularity"].astype(np.float64)))  # faster than r.choice
        for k in range(20 * p.history):  # a user that hardly clicks stops short of the target
            if not active.size:
                break
            if p.has_intent():
                intent[active] = self._next_intent(intent[active], r)
            uidx = start + active
            items, rel_logit = self._show(uidx, intent[active] if p.has_intent() else None, r, r, by_popularity)
            m = len(active)
            flat_items = items.reshape(-1)
            match = self.items["category"][flat_items] == np.repeat(intent[active], K) if p.has_intent() else None
            o = self._outcomes(
                np.repeat(uidx, K),
                flat_items,
                rel_logit.reshape(-1),
                np.tile(np.arange(K), m),
                np.repeat(self.users["web"][uidx].astype(np.int8), K),
                match,
                r,
            )
            row = np.flatnonzero(o["click"])
            who = active[row // K]
            ev.append((who, np.full(row.size, k), flat_items[row], _behaviour(o, row)))
            got[active] += np.bincount(row // K, minlength=m)
            rounds[active] += 1
            active = active[got[active] < target[active]]
        who, k, item, kind = (np.concatenate(c) for c in zip(*ev, strict=True)) if ev else [np.zeros(0, np.int64)] * 4
        order = np.argsort(who, kind="stable")  # by user, then round, then position
        who, k, item, kind = who[order], k[order], item[order], kind[order]
        # request k of a user with R past requests took place sum(gaps k..R-1) before t0; a user's
        # requests come at a pace in proportion to their activity, as in the traffic
        gap_start = np.concatenate([[0], np.cumsum(rounds)])
        mean_gap = np.repeat(p.history_gap_hours * 3600.0 / self.users["activity"][start : start + n], rounds)
        gaps = r.exponential(1.0, int(rounds.sum())) * mean_gap
        cum = np.concatenate([[0.0], np.cumsum(gaps)])
        t = t0 - (cum[gap_start[who + 1]] - cum[gap_start[who] + k])
        # keep each user's newest `target` behaviours
        n_ev = np.bincount(who, minlength=n)
        rank_from_end = np.concatenate([[0], np.cumsum(n_ev)])[who + 1] - 1 - np.arange(who.size)
        keep = rank_from_end < target[who]
        who, item, kind, t = who[keep], item[keep], kind[keep], t[keep]
        length = np.bincount(who, minlength=n)
        slot = np.arange(who.size) - np.concatenate([[0], np.cumsum(length)])[who]
        u = start + who
        self.h_item[u, slot] = item
        self.h_type[u, slot] = kind
        self.h_dev[u, slot] = self.users["web"][u]
        self.h_time[u, slot] = t
        self.h_len[start : start + n] = length

    def _histories(
        self, uidx: np.ndarray, req: np.ndarray, items: np.ndarray, o: dict[str, np.ndarray], t_req: np.ndarray
    ) -> dict[str, pa.Array]:
        """The hist_* list columns of one file's rows (each row: its user's behaviours before its
        request, oldest first, the newest `history`), then this file's behaviours join the users'
        state. Nothing in the click model reads the history, so the file's clicks are all drawn
        first and every request then sees exactly the behaviours of all its user's earlier
        requests, this file's included."""
        H, n_req = self.p.history, len(uidx)
        b = np.flatnonzero(o["click"])  # rows in (request, position) order
        b = b[np.argsort(uidx[req[b]], kind="stable")]  # by user, then request, then position
        b_user, b_req = uidx[req[b]], req[b]
        key = b_user * (n_req + 1) + b_req
        # per request: its user's behaviours in this file end at `before` (those of earlier requests)
        before = np.searchsorted(key, uidx * (n_req + 1) + np.arange(n_req))
        since = before - np.searchsorted(key, uidx * (n_req + 1))
        n_old = self.h_item.size
        src = {
            "item": np.concatenate([self.h_item.reshape(-1), items[b]]),
            "type": np.concatenate([self.h_type.reshape(-1), _behaviour(o, b)]),
            "dev": np.concatenate([self.h_dev.reshape(-1), self.users["web"][b_user].astype(np.int8)]),
            "time": np.concatenate([self.h_time.reshape(-1), t_req[b_req]]),
        }

        def newest(users: np.ndarray, end: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Indices into `src` of the newest H of (state of `users`, then their `count` file
            behaviours ending at `end`), oldest first, and the lengths."""
            old_len = self.h_len[users]
            new = np.minimum(count, H)
            old = np.minimum(old_len, H - new)
            starts = np.stack([users * H + old_len - old, n_old + end - new], axis=1).reshape(-1)
            return _ranges(starts, np.stack([old, new], axis=1).reshape(-1)), old + new

        idx, length = newest(uidx, before, since)
        offsets = np.concatenate([[0], np.cumsum(length)])
        row_idx = idx[_ranges(offsets[req], length[req])]
        row_len = length[req]
        row_offsets = np.concatenate([[0], np.cumsum(row_len)])
        if row_offsets[-1] > np.iinfo(np.int32).max:
            raise MtrecError(
                f"history lists of {row_offsets[-1]:,} values do not fit one file's list column; "
                "pass more --files-per-day"
            )
        it = self.items.cols
        item = src["item"][row_idx]
        hours = (np.repeat(t_req[req], row_len) - src["time"][row_idx]) / 3600.0
        offsets_pa = pa.array(row_offsets.astype(np.int32))
        cols = {
            "hist_item_id": it["id"][item],
            "hist_item_category": it["category"][item],
            "hist_brand": it["brand"][item],
            "hist_behavior": src["type"][row_idx].astype(np.int64),
            "hist_scenario": src["dev"][row_idx].astype(np.int64),
            "hist_age_hours": np.floor(np.log2(1.0 + hours)).astype(np.int64),
            "hist_price_bucket": it["price_bucket"][item],
        }
        out = {name: pa.ListArray.from_arrays(offsets_pa, pa.array(v, pa.int64())) for name, v in cols.items()}
        # the state takes the file's behaviours: per user, the newest H of old + new
        users, first, count = np.unique(b_user, return_index=True, return_counts=True)
        idx, length = newest(users, first + count, count)
        slots = _ranges(users * H, length)
        for name, state in (("item", self.h_item), ("type", self.h_type), ("dev", self.h_dev), ("time", self.h_time)):
            state.reshape(-1)[slots] = src[name][idx]
        self.h_len[users] = length
        return out

    # ---- traffic ---------------------------------------------------------------------------------
    def _show(
        self,
        uidx: np.ndarray,
        intent: np.ndarray | None,
        r: np.random.Generator,
        r_new: np.random.Generator,
        by_popularity: _Alias | None = None,
        hour: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per request, the items the logging policy shows at positions 0..K-1 and their relevance
        logits (n_req x K). Candidates are drawn by popularity (with `by_popularity` if given, else
        `r.choice`, times the intra-day cycle at `hour`; `intent_candidates` of them from the intent
        category, drawn from `r_new`), ranked by relevance plus the policy's error and promotion."""
        p, it = self.p, self.items.cols
        K, C = p.positions, p.candidates
        if by_popularity is not None:
            cand = by_popularity.draw(r, (len(uidx), C))
        else:
            item_p = np.exp(it["popularity"] + self._cycle(self.category_phase[it["category"]], hour))
            item_p /= item_p.sum()
            cand = r.choice(len(self.items), size=(len(uidx), C), p=item_p)  # n_req x C
        if intent is not None and p.intent_candidates:
            # retrieval from the user's recent behaviour: here from the intent it reveals
            cand[:, C - p.intent_candidates :] = self._in_category(intent, p.intent_candidates, r_new)
        taste = self.users["taste"][uidx]  # n_req x d
        scale = 1.0 / math.sqrt(p.latent_dim)
        aff_click = np.einsum("rd,rcd->rc", taste, it["click_lat"][cand]) * scale  # n_req x C
        rel_logit = p.click_bias + p.click_scale * aff_click + it["popularity"][cand] + it["appeal"][cand]
        if intent is not None:
            rel_logit = rel_logit + np.float32(p.intent_strength) * (it["category"][cand] == intent[:, None])
        if p.power_effect:  # users with more purchasing power click dearer items
            tilt = self.users["power"][uidx][:, None] * (it["log_price"][cand] - 3.0)
            rel_logit = rel_logit + np.float32(p.power_effect) * tilt
        # the logging policy: relevance, plus its own error, plus item promotion (business rules)
        policy = rel_logit + it["boost"][cand] + p.policy_noise * r.standard_normal(rel_logit.shape, dtype=np.float32)
        order = np.argsort(-policy, axis=1)
        shown = order[:, :K]  # n_req x K, position order
        self._last_candidates = (cand, rel_logit, order)  # for the candidate logs (`traffic`)
        return np.take_along_axis(cand, shown, axis=1), np.take_along_axis(rel_logit, shown, axis=1)

    def _outcomes(
        self,
        user: np.ndarray,
        items: np.ndarray,
        rel_logit: np.ndarray,
        pos: np.ndarray,
        device: np.ndarray,
        match: np.ndarray | None,
        r: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        """True probabilities and drawn labels of impressions (one entry per row); `match` marks
        the rows whose item is in the user's intent category (None: no intent)."""
        p, us, it = self.p, self.users.cols, self.items.cols
        scale = 1.0 / math.sqrt(p.latent_dim)
        taste_r = us["taste"][user]
        aff_conv = np.einsum("nd,nd->n", taste_r, it["conv_lat"][items]) * scale
        aff_watch = np.einsum("nd,nd->n", taste_r, it["watch_lat"][items]) * scale
        price_z = it["log_price"][items] - 3.0

        p_exam = p.examination()[pos] * np.asarray(p.device_exam, dtype=np.float64)[device]
        p_rel = _sigmoid(rel_logit)
        p_click = p_exam * p_rel
        p_dact = _sigmoid(p.daction_bias + p.daction_scale * aff_conv)
        buy_logit = p.buy_bias + p.buy_scale * aff_conv + p.price_effect * price_z + it["quality"][items]
        if match is not None:
            buy_logit = buy_logit + np.float32(p.intent_buy) * match
        if p.power_effect:  # ... and buy them
            buy_logit = buy_logit + np.float32(p.power_effect) * us["power"][user] * price_z
        p_buy_d = _sigmoid(buy_logit + p.buy_after_daction)
        p_buy_o = _sigmoid(buy_logit + p.buy_after_oaction)
        cvr = p_dact * p_buy_d + (1 - p_dact) * p_buy_o
        watch_mu = p.watch_log_mean + p.watch_scale * aff_watch

        rows = len(items)
        click = r.random(rows) < p_click
        dact = click & (r.random(rows) < p_dact)
        oact = click & ~dact
        buy = click & (r.random(rows) < np.where(dact, p_buy_d, p_buy_o))
        watch = np.where(click, np.exp(watch_mu + p.watch_noise * r.standard_normal(rows)), 0.0)
        return {
            "p_exam": p_exam,
            "p_rel": p_rel,
            "p_click": p_click,
            "p_dact": p_dact,
            "p_buy_d": p_buy_d,
            "p_buy_o": p_buy_o,
            "cvr": cvr,
            "watch_mu": watch_mu,
            "click": click,
            "dact": dact,
            "oact": oact,
            "buy": buy,
            "watch": watch,
        }

    def _cycle(self, phase: np.ndarray, hour: float | None) -> np.ndarray | float:
        """The intra-day cycle's log-weight at `hour` of things peaking at `phase` (fractions of a
        day); 0 without a cycle."""
        if not self.p.cycle_strength or hour is None:
            return 0.0
        return (self.p.cycle_strength * np.cos(2 * np.pi * (hour / 24.0 - phase))).astype(np.float32)

    def user_rates(self, hour: float | None = None) -> np.ndarray:
        """Each user's share of the requests at `hour` (the whole day's when None or without a
        cycle): activity, times the cycle of their segment and of their device."""
        us = self.users.cols
        if not self.p.cycle_strength or hour is None:
            return us["activity"] / us["activity"].sum()
        device_phase = np.where(us["web"], self.p.web_peak_hour, self.p.app_peak_hour) / 24.0
        w = us["activity"] * np.exp(
            self._cycle(self.segment_phase[us["segment"]], hour) + self._cycle(device_phase, hour)
        )
        return w / w.sum()

    def traffic(
        self, rows: int, part: int, first_row: int, t0: float, t1: float, day: dt.date, candidates: bool = False
    ) -> tuple[pa.Table, pa.Table, tuple[pa.Table, pa.Table] | None]:
        """`rows` impressions with request times in [t0, t1) seconds of the day: (logs, truth,
        candidates). With an intra-day cycle, the mix of users and candidates is the one at the
        middle of [t0, t1). With `candidates`, also (candidate logs, their truth): see
        `_candidate_tables`; else None."""
        p = self.p
        hour = (t0 + t1) / 2 / 3600.0
        r = np.random.default_rng([self.seed, 1, self.day_index, part])
        # intents, intent retrieval: a stream of their own, so the world without them is unchanged
        r_new = np.random.default_rng([self.seed, 4, self.day_index, part])
        K = p.positions
        n_req = -(-rows // K)
        us, it = self.users.cols, self.items.cols
        uidx = r.choice(len(self.users), size=n_req, p=self.user_rates(hour))  # in time order (ts_req below)
        intent = self._request_intents(uidx, r_new) if p.has_intent() else None
        shown_items, shown_rel = self._show(uidx, intent, r, r_new, hour=hour)
        items = shown_items.reshape(-1)[:rows]
        rel_logit = shown_rel.reshape(-1)[:rows]
        req = np.repeat(np.arange(n_req), K)[:rows]
        pos = np.tile(np.arange(K, dtype=np.int32), n_req)[:rows]
        user = uidx[req]
        device = us["web"][user].astype(np.int8)
        match = None if intent is None else it["category"][items] == intent[req]
        o = self._outcomes(user, items, rel_logit, pos, device, match, r)
        p_exam, p_rel, p_click, p_dact = o["p_exam"], o["p_rel"], o["p_click"], o["p_dact"]
        p_buy_d, p_buy_o, cvr, watch_mu = o["p_buy_d"], o["p_buy_o"], o["cvr"], o["watch_mu"]
        click, dact, oact, buy, watch = o["click"], o["dact"], o["oact"], o["buy"], o["watch"]

        ts_req = np.sort(r.uniform(t0, t1, n_req))
        ts = np.datetime64(day.isoformat(), "ms") + (ts_req[req] * 1000).astype("timedelta64[ms]")
        row_id = np.arange(first_row, first_row + rows, dtype=np.int64)
        req_global = req + first_row // K  # unique within the day: parts start on request boundaries
        tags = it["tags"][items]
        tag_mask = it["tag_mask"][items]
        offsets = np.concatenate([[0], np.cumsum(tag_mask.sum(axis=1))]).astype(np.int32)
        activity = us["activity"][user] * r.lognormal(0, 0.2, rows)  # observed with noise
        popularity = _sigmoid(it["popularity"][items] + 0.3 * r.standard_normal(rows) - 2.0)

        logs = pa.table(
            {
                "row_id": row_id,
                "request_id": pc.binary_join_element_wise(
                    f"{day:%Y%m%d}-", pc.cast(pa.array(req_global), pa.string()), ""
                ),
                "ts": pa.array(ts, pa.timestamp("ms", tz="UTC")),
                "user_id": us["id"][user],
                "item_id": it["id"][items],
                "position": pos,
                "device": device,
                "click": click.astype(np.int8),
                "conversion": buy.astype(np.int8),
                "daction": dact.astype(np.int8),
                "oaction": oact.astype(np.int8),
                "watch_time": watch.astype(np.float32),
                "user_segment": us["segment"][user],
                "age_bucket": us["age"][user],
                "item_category": it["category"][items],
                "brand": it["brand"][items],
                "shop": it["shop"][items],
                "price_bucket": it["price_bucket"][items],
                "item_tags": pa.ListArray.from_arrays(offsets, tags[tag_mask]),
                "user_activity": activity.astype(np.float32),
                "item_price": np.exp(it["log_price"][items]).astype(np.float32),
                "item_popularity": popularity.astype(np.float32),
            }
        )
        if p.history:
            hist = self._histories(uidx, req, items, o, self.day_index * 86_400.0 + ts_req)
            for name, column in hist.items():
                logs = logs.append_column(name, column)
        truth = pa.table(
            {
                "row_id": row_id,
                "p_examine": p_exam.astype(np.float32),
                "p_click_unbiased": p_rel.astype(np.float32),  # relevance: click prob. with the position effect removed
                "p_click": p_click.astype(np.float32),
                "p_daction": p_dact.astype(np.float32),  # given click
                "p_buy_daction": p_buy_d.astype(np.float32),
                "p_buy_oaction": p_buy_o.astype(np.float32),
                "cvr": cvr.astype(np.float32),  # given click
                "ctcvr": (p_click * cvr).astype(np.float32),
                "ctcvr_unbiased": (p_rel * cvr).astype(np.float32),
                "watch_log_mean": watch_mu.astype(np.float32),  # E[log watch_time | click]
                "new_user": user >= self.first_new_user,  # first seen today
                "new_item": items >= self.first_new_item,
            }
        )
        if intent is not None:
            truth = truth.append_column("intent", pa.array(intent[req], pa.int64()))  # the user's intent category
        if p.power_levels:  # a user-level label, repeated on each of the user's rows
            logs = logs.append_column("power_level", pa.array(us["power_level"][user]))
            for k in range(p.power_levels):  # p(level k | the user's latent): the label's truth
                truth = truth.append_column(f"power_level_p{k}", pa.array(us["power_p"][user, k].astype(np.float32)))
        cands = self._candidate_tables(logs, uidx, intent, req_global, first_row // K, part) if candidates else None
        return logs, truth, cands

    def _candidate_tables(
        self,
        logs: pa.Table,
        uidx: np.ndarray,
        intent: np.ndarray | None,
        req_global: np.ndarray,
        first_req: int,
        part: int,
    ) -> tuple[pa.Table, pa.Table]:
        """What serving-time feature logging records: every candidate the logging policy ranked for
        each request of `logs` (shown or not), with the request's user side (its features, device,
        time and history, as on its logged rows) and the candidate's item features, no labels and
        no position; and their truth (relevance, CVR, whether and where it was shown). Draws (the
        observation noise of the noisy features) come from a stream of their own, so the logs are
        the same with or without candidates."""
        us, it = self.users.cols, self.items.cols
        cand, rel, order = self._last_candidates
        n_req, C = cand.shape
        r = np.random.default_rng([self.seed, 7, self.day_index, part])
        items, rel_logit = cand.reshape(-1), rel.reshape(-1)
        req = np.repeat(np.arange(n_req), C)
        user = uidx[req]
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(C)[None, :], axis=1)  # the policy's rank of each candidate
        rank = rank.reshape(-1)
        match = None if intent is None else it["category"][items] == intent[req]
        o = self._outcomes(
            user, items, rel_logit, np.zeros(len(items), np.int64), us["web"][user].astype(np.int8), match, r
        )
        # the request's user side as logged: its first logged row (every row of a request shares it);
        # a shown candidate is the logged row at its position (the file's last request may be cut short)
        first_rows = np.searchsorted(req_global, np.arange(first_req, first_req + n_req))
        logged = np.bincount(req_global - first_req, minlength=n_req)[req]  # rows logged of each one's request
        shown = rank < logged
        at = np.where(shown, first_rows[req] + rank, 0)  # its logged row, if shown
        user_side = ["request_id", "ts", "user_id", "device", "user_segment", "age_bucket"]
        user_side += [c for c in logs.column_names if c.startswith("hist_")]
        side = logs.select(user_side).take(pa.array(first_rows[req]))
        tags, tag_mask = it["tags"][items], it["tag_mask"][items]
        offsets = np.concatenate([[0], np.cumsum(tag_mask.sum(axis=1))]).astype(np.int32)
        row_id = (first_req + req) * C + np.tile(np.arange(C), n_req)
        cols = {
            "row_id": pa.array(row_id.astype(np.int64)),
            **{c: side.column(c) for c in user_side},
            "item_id": pa.array(it["id"][items]),
            "item_category": pa.array(it["category"][items]),
            "brand": pa.array(it["brand"][items]),
            "shop": pa.array(it["shop"][items]),
            "price_bucket": pa.array(it["price_bucket"][items]),
            "item_tags": pa.ListArray.from_arrays(offsets, tags[tag_mask]),
            "user_activity": pa.array((us["activity"][user] * r.lognormal(0, 0.2, len(items))).astype(np.float32)),
            "item_price": pa.array(np.exp(it["log_price"][items]).astype(np.float32)),
            "item_popularity": pa.array(
                _sigmoid(it["popularity"][items] + 0.3 * r.standard_normal(len(items)) - 2.0).astype(np.float32)
            ),
        }
        for c in ("user_activity", "item_popularity"):  # observed once: a shown candidate's is its impression's
            cols[c] = pa.array(np.where(shown, logs.column(c).to_numpy()[at], cols[c].to_numpy()))
        truth = pa.table(
            {
                "row_id": cols["row_id"],
                "p_click_unbiased": o["p_rel"].astype(np.float32),
                "cvr": o["cvr"].astype(np.float32),
                "ctcvr_unbiased": (o["p_rel"] * o["cvr"]).astype(np.float32),
                "policy_rank": rank.astype(np.int32),  # 0 = the policy's first choice
                "shown": shown,  # logged as an impression at position policy_rank
            }
        )
        return pa.table(cols), truth


class _Alias:
    """Draws from a discrete distribution in O(1) each (Vose's alias method); `Generator.choice`
    with probabilities costs a binary search per draw."""

    def __init__(self, weights: np.ndarray):
        n = len(weights)
        scaled = weights / weights.sum() * n
        self.prob = np.ones(n)
        self.alias = np.arange(n)
        small = [i for i in range(n) if scaled[i] < 1.0]
        large = [i for i in range(n) if scaled[i] >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            self.prob[s], self.alias[s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)

    def draw(self, r: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        slot = r.integers(0, len(self.prob), shape)
        return np.where(r.random(shape) < self.prob[slot], slot, self.alias[slot])


def _behaviour(o: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The behaviour a clicked impression leaves in the history: its strongest action (1 click,
    2 add-to-cart (daction), 3 buy)."""
    return np.where(o["buy"][rows], 3, np.where(o["dact"][rows], 2, 1)).astype(np.int8)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) over (s, n) pairs."""
    lengths = np.asarray(lengths, np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, np.int64) - (ends - lengths), lengths) + np.arange(ends[-1] if ends.size else 0)


@dataclass
class Export:
    """How the world is exported besides the logs in time order.

    Attributes:
        sort_by: a logs column; each day is then written sorted by it (stable, ascending), across
            its files, as some exports are (by label, by user). None: time order.
        candidates: a second root (any fsspec URL); gets, per day and file, every candidate each
            request scored, as serving-time feature logging records them (features, no labels, no
            position), and their truth under ``_truth/``. None: not written.
    """

    sort_by: str | None = None
    candidates: str | None = None


@dataclass
class WorldSummary:
    out: str
    start: str
    days: list[str]
    rows: list[int]
    seed: int
    files_per_day: int
    seconds: list[float] = field(default_factory=list)
    sort_by: str | None = None
    params: dict = field(default_factory=dict)
    candidates: str | None = None  # the root of the candidate logs, if written


def write_world(
    out: str,
    days: int,
    rows_per_day: int,
    seed: int = 0,
    start: dt.date = dt.date(2026, 1, 1),
    files_per_day: int | None = None,
    params: WorldParams | None = None,
    export: Export | None = None,
) -> WorldSummary:
    """Write `days` day partitions of logs (+ truth) under `out` (any fsspec URL).

    Args:
        out (str): logs root; gets ``dt=YYYY-MM-DD/part-NNNNN.parquet``, ``_truth/dt=.../`` and
            ``_world.json`` (parameters, seed, examination curve).
        days (int): number of days, starting at `start`.
        rows_per_day (int): impressions per day (exactly).
        seed (int): the world is deterministic for a seed.
        files_per_day (int | None): Parquet files per day; file k holds the k-th slice of the day's
            hours. None: 24 (hour by hour) for a world with an intra-day cycle, else 4.
        params (WorldParams | None): the generative model; defaults if None.
        export (Export | None): a sorted export, candidate logs (`Export`); None: neither.

    Returns:
        WorldSummary: what was written and how long each day took.
    """
    if days < 1:
        raise MtrecError(f"`--days` must be >= 1, got {days}; pass --days 1 or more")
    if rows_per_day < 1:
        raise MtrecError(f"`--rows-per-day` must be >= 1, got {rows_per_day}; pass --rows-per-day 1 or more")
    params = params or WorldParams()
    sort_by, candidates = (export.sort_by, export.candidates) if export is not None else (None, None)
    if files_per_day is None:
        files_per_day = 24 if params.cycle_strength else 4
    if files_per_day < 1:
        raise MtrecError(f"`--files-per-day` must be >= 1, got {files_per_day}; pass --files-per-day 1 or more")
    problem = check_params(params)
    if problem:
        raise MtrecError(f"WorldParams {problem}")
    if candidates is not None and _overlap(out, candidates):
        raise MtrecError(
            f"--candidates {candidates} overlaps --out {out}; write the candidates under a root of their own"
        )
    world = World(params, seed)
    fs, _ = filesystem(out)
    prepared = False  # the roots are cleared only once day 1 is generated (and --sort-by checked)
    summary = WorldSummary(
        out=out,
        start=start.isoformat(),
        days=[],
        rows=[],
        seed=seed,
        files_per_day=files_per_day,
        params={**asdict(params), "examination": params.examination().round(6).tolist()},
        sort_by=sort_by,
        candidates=candidates,
    )
    K = params.positions
    for d in range(days):
        t_day = time.perf_counter()
        day = start + dt.timedelta(days=d)
        if d > 0:
            world.advance()
        # parts are cut on request boundaries so that request ids stay whole within one file
        n_req = -(-rows_per_day // K)
        req_cuts = np.linspace(0, n_req, files_per_day + 1).round().astype(int)
        parts, cand_parts = [], []
        for part in range(files_per_day):
            first, last = req_cuts[part] * K, min(req_cuts[part + 1] * K, rows_per_day)
            if last <= first:
                continue
            secs = 86_400 / files_per_day
            logs, truth, cands = world.traffic(
                last - first, part, first, part * secs, (part + 1) * secs, day, candidates=candidates is not None
            )
            parts.append((part, logs, truth))
            if cands is not None:
                cand_parts.append((part, *cands))
        if sort_by is not None:
            parts = _sorted_parts(parts, sort_by)
        if not prepared:
            for root in (out, candidates) if candidates is not None else (out,):
                _prepare_out(root)
            prepared = True
        for part, logs, truth in cand_parts:
            for root, table in ((candidates, logs), (join(candidates, TRUTH_DIR), truth)):
                _write(root, day, part, table)
        for part, logs, truth in parts:
            for root, table in ((out, logs), (join(out, TRUTH_DIR), truth)):
                _write(root, day, part, table)
        summary.days.append(day.isoformat())
        summary.rows.append(rows_per_day)
        summary.seconds.append(round(time.perf_counter() - t_day, 3))
        log.info(f"  {day}: {rows_per_day:,} rows in {files_per_day} files ({summary.seconds[-1]:.1f}s)")
    for root in (out, candidates) if candidates is not None else (out,):
        rfs, rpath = filesystem(root)
        with rfs.open(f"{rpath}/{WORLD_FILE}", "w") as fh:
            fh.write(json.dumps(asdict(summary), indent=2))
    return summary


def _overlap(a: str, b: str) -> bool:
    """Whether one root is the other or inside it."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _write(root: str, day: dt.date, part: int, table: pa.Table) -> None:
    folder = day_url(root, day)
    dfs, dpath = filesystem(folder)
    dfs.makedirs(dpath, exist_ok=True)
    with dfs.open(f"{dpath}/part-{part:05d}.parquet", "wb") as fh:
        pq.write_table(table, fh, compression="snappy")


def _sorted_parts(parts: list[tuple[int, pa.Table, pa.Table]], column: str) -> list[tuple[int, pa.Table, pa.Table]]:
    """A day's parts re-cut so that the day reads sorted by `column` (then row id) across its files,
    each file keeping its row count; the truth stays in time order (it is joined on row_id)."""
    logs = pa.concat_tables([p[1] for p in parts])
    if column not in logs.column_names or isinstance(logs.schema.field(column).type, pa.ListType):
        sortable = [f.name for f in logs.schema if not isinstance(f.type, pa.ListType)]
        raise MtrecError(f"--sort-by {column!r}: not a column the world writes; choose one of {', '.join(sortable)}")
    logs = logs.take(pc.sort_indices(logs, [(column, "ascending"), ("row_id", "ascending")]))
    out, start = [], 0
    for part, chunk, truth in parts:
        out.append((part, logs.slice(start, chunk.num_rows), truth))
        start += chunk.num_rows
    return out


def _prepare_out(out: str) -> None:
    """An empty folder, or a synthetic world written before (replaced whole: no stale part files
    from an earlier run may mix with the new one). Anything else is refused, never deleted."""
    fs, path = filesystem(out)
    if not fs.exists(path) or not fs.ls(path, detail=False):
        return
    if not fs.exists(f"{path}/{WORLD_FILE}"):
        raise MtrecError(
            f"{out} is not empty and holds no {WORLD_FILE}; `mtrec synth` "
            "writes only into an empty folder or over a world it wrote"
        )
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("dt=") or name in (TRUTH_DIR, WORLD_FILE):
            fs.rm(entry, recursive=True)


def read_world(out: str) -> dict:
    """The `_world.json` written beside a synthetic world (parameters, examination curve, days)."""
    fs, path = filesystem(out)
    try:
        with fs.open(f"{path}/{WORLD_FILE}", "r") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise MtrecError(f"{out} holds no {WORLD_FILE}: it is not a synthetic world written by `mtrec synth`") from None
