"""The synthetic world's ground truth holds: position bias, label chain, ESM2 structure, drift."""

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import DAY1

from mtrec.data.synth import Export, WorldParams, read_world, world_params, write_world
from mtrec.errors import MtrecError

DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]


def _day(root: str, day: str, truth: bool = False):
    sub = f"_truth/dt={day}" if truth else f"dt={day}"
    return ds.dataset(f"{root}/{sub}").to_table()


@pytest.fixture(scope="module")
def big_day(tmp_path_factory) -> str:
    """One day of 100,000 rows: enough for the statistical checks below."""
    root = str(tmp_path_factory.mktemp("bigworld"))
    write_world(root, days=1, rows_per_day=100_000, seed=11)
    return root


def test_layout_sizes_and_types(world):
    assert sorted(p.name for p in Path(world).iterdir()) == ["_truth", "_world.json", *[f"dt={d}" for d in DAYS]]
    files = sorted(Path(world, f"dt={DAYS[0]}").glob("*.parquet"))
    assert [f.name for f in files] == [f"part-0000{i}.parquet" for i in range(4)]
    logs, truth = _day(world, DAYS[0]), _day(world, DAYS[0], truth=True)
    assert logs.num_rows == truth.num_rows == 20_000
    assert logs.column("row_id").to_pylist() == truth.column("row_id").to_pylist() == list(range(20_000))
    types = {f.name: str(f.type) for f in logs.schema}
    assert (types["user_id"], types["item_id"], types["position"], types["click"], types["conversion"]) == (
        "int64",
        "int64",
        "int32",
        "int8",
        "int8",
    )
    assert (
        types["item_tags"].startswith("list<")
        and types["item_tags"].endswith("int64>")
        and types["watch_time"] == "float"
    )
    # a request never straddles two files, so request ids are whole within a file
    per_file = [set(pq.read_table(f, columns=["request_id"]).column(0).to_pylist()) for f in files]
    assert all(not (a & b) for i, a in enumerate(per_file) for b in per_file[i + 1 :])
    # files are time slices: file k's requests come before file k+1's
    ts = [pq.read_table(f, columns=["ts"]).column(0) for f in files]
    assert all(ts[i].to_numpy().max() <= ts[i + 1].to_numpy().min() for i in range(3))


def test_deterministic_for_seed_and_prefix_stable(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    write_world(a, days=2, rows_per_day=2000, seed=5)
    write_world(b, days=3, rows_per_day=2000, seed=5)
    write_world(c, days=2, rows_per_day=2000, seed=6)
    for day in DAYS[:2]:
        assert _day(a, day).equals(_day(b, day)) and _day(a, day, True).equals(_day(b, day, True))
        assert not _day(a, day).equals(_day(c, day))


def test_click_rate_by_position_matches_examination_curve(big_day):
    logs, truth = _day(big_day, DAYS[0]), _day(big_day, DAYS[0], True)
    exam = np.array(read_world(big_day)["params"]["examination"])
    pos = logs.column("position").to_numpy()
    app = logs.column("device").to_numpy() == 0  # device 0 has examination factor 1.0
    click = logs.column("click").to_numpy()
    rel = truth.column("p_click_unbiased").to_numpy()
    for k in range(len(exam)):
        # clicks at position k = Binomial(sum over rows of exam[k] * relevance): within 4 std. errors
        p = exam[k] * rel[app & (pos == k)]
        observed, expected, sd = click[app & (pos == k)].sum(), p.sum(), np.sqrt((p * (1 - p)).sum())
        assert abs(observed - expected) < 4 * sd, (k, observed, expected, sd)
    # E[click | pos] / E[relevance | pos] estimates p(examined | pos): same order as the curve
    est = np.array([click[app & (pos == k)].sum() / rel[app & (pos == k)].sum() for k in range(len(exam))])
    assert np.all(np.diff(exam) < 0)
    assert np.corrcoef(est, exam)[0, 1] > 0.99
    # the logging policy puts more relevant items first: position is confounded with relevance
    mean_rel = [rel[pos == k].mean() for k in range(len(exam))]
    assert mean_rel[0] > mean_rel[-1]


def test_label_chain_never_broken(world):
    for day in DAYS:
        t = _day(world, day)
        click, conv, dact, oact = (t.column(c).to_numpy() for c in ("click", "conversion", "daction", "oaction"))
        assert not np.any((conv == 1) & (click == 0))
        assert not np.any((dact == 1) & (click == 0)) and not np.any((oact == 1) & (click == 0))
        assert not np.any((dact == 1) & (oact == 1))
        assert np.all((dact | oact) == click)  # every click ends in one of the two actions
        watch = t.column("watch_time").to_numpy()
        assert np.all(watch[click == 0] == 0) and np.all(watch[click == 1] > 0)


def test_conversion_after_daction_vs_oaction_as_configured(big_day):
    t, tr = _day(big_day, DAYS[0]), _day(big_day, DAYS[0], True)
    conv, dact, oact = (t.column(c).to_numpy() for c in ("conversion", "daction", "oaction"))
    p_d, p_o = tr.column("p_buy_daction").to_numpy(), tr.column("p_buy_oaction").to_numpy()
    emp_d, emp_o = conv[dact == 1].mean(), conv[oact == 1].mean()
    # empirical rates match the configured probabilities within 4 standard errors
    for emp, p in ((emp_d, p_d[dact == 1]), (emp_o, p_o[oact == 1])):
        assert abs(emp - p.mean()) < 4 * np.sqrt(p.mean() * (1 - p.mean()) / p.size)
    assert emp_d > 8 * emp_o  # p(buy | daction) >> p(buy | oaction)


def test_selection_bias_and_task_conflict_are_real(big_day):
    t, tr = _day(big_day, DAYS[0]), _day(big_day, DAYS[0], True)
    click = t.column("click").to_numpy() == 1
    cvr = tr.column("cvr").to_numpy()
    # CVR over clicked rows differs from CVR over all impressions: naive CVR training is biased
    assert cvr.mean() / cvr[click].mean() > 1.15
    rel = tr.column("p_click_unbiased").to_numpy()
    assert np.corrcoef(rel, cvr)[0, 1] < -0.15
    assert np.corrcoef(rel, tr.column("watch_log_mean").to_numpy())[0, 1] < -0.25


def test_new_ids_appear_on_later_days(world):
    seen_users = set(_day(world, DAYS[0]).column("user_id").to_pylist())
    seen_items = set(_day(world, DAYS[0]).column("item_id").to_pylist())
    assert not _day(world, DAYS[0], True).column("new_user").to_numpy().any()
    for day in DAYS[1:]:
        t, tr = _day(world, day), _day(world, day, True)
        new_u = tr.column("new_user").to_numpy()
        new_i = tr.column("new_item").to_numpy()
        assert 0.005 < new_u.mean() < 0.1 and 0.01 < new_i.mean() < 0.2
        users = t.column("user_id").to_numpy()
        items = t.column("item_id").to_numpy()
        assert not (set(users[new_u].tolist()) & seen_users)  # truly never seen before
        assert not (set(items[new_i].tolist()) & seen_items)
        seen_users |= set(users.tolist())
        seen_items |= set(items.tolist())


def test_world_json_and_memory_url():
    s = write_world("memory://synth-t", days=1, rows_per_day=1234, seed=0, files_per_day=3, start=dt.date(2025, 12, 31))
    assert s.rows == [1234] and s.days == ["2025-12-31"]
    meta = read_world("memory://synth-t")
    assert meta["seed"] == 0 and len(meta["params"]["examination"]) == WorldParams().positions
    import fsspec

    assert ds.dataset("/synth-t/dt=2025-12-31", filesystem=fsspec.filesystem("memory")).count_rows() == 1234
    assert json.dumps(meta)


def test_bad_arguments():
    with pytest.raises(MtrecError, match=r"`--days` must be >= 1, got 0"):
        write_world("memory://x", days=0, rows_per_day=10)
    with pytest.raises(MtrecError, match=r"`--rows-per-day` must be >= 1, got -5"):
        write_world("memory://x", days=1, rows_per_day=-5)
    with pytest.raises(MtrecError, match="not a synthetic world"):
        read_world("memory://nothing-here")


def test_item_quality_leaves_everything_else_of_the_world_as_it_was(tmp_path):
    """Quality and appeal draw from their own stream: switching quality on changes who buys, and
    nothing else; every other column, and the click probabilities, are the default world's."""
    plain, quality = str(tmp_path / "plain"), str(tmp_path / "quality")
    write_world(plain, days=2, rows_per_day=5000, seed=3)
    write_world(quality, days=2, rows_per_day=5000, seed=3, params=WorldParams(quality_std=1.0))
    for day in DAYS[:2]:
        a, b = _day(plain, day), _day(quality, day)
        same = [c for c in a.column_names if c != "conversion"]
        assert a.select(same).equals(b.select(same))
        assert not a.column("conversion").equals(b.column("conversion"))
        ta, tb = _day(plain, day, True), _day(quality, day, True)
        assert ta.column("p_click").equals(tb.column("p_click")) and not ta.column("cvr").equals(tb.column("cvr"))


def test_appeal_and_quality_tie_an_items_clicks_to_its_purchases(tmp_path):
    """With rho_quality > 0 an item's unobserved appeal (clicks) and quality (purchases) go
    together, so its click rate carries information about its conversion rate."""

    def item_corr(params: WorldParams) -> float:
        root = str(tmp_path / f"w{params.rho_quality}")
        write_world(root, days=1, rows_per_day=60_000, seed=4, params=params)
        t, tr = _day(root, DAYS[0]), _day(root, DAYS[0], True)
        item = t.column("item_id").to_numpy()
        _, idx, n = np.unique(item, return_inverse=True, return_counts=True)
        mean = lambda x: np.bincount(idx, weights=x) / n  # noqa: E731
        keep = n >= 20
        rel, cvr = (mean(tr.column(c).to_numpy().astype(np.float64))[keep] for c in ("p_click_unbiased", "cvr"))
        return np.corrcoef(rel, cvr)[0, 1]

    from mtrec.data.synth import world_params

    tied = item_corr(world_params([], "item_quality"))
    apart = item_corr(world_params(["rho_quality=0"], "item_quality"))
    # per item, mean true relevance vs mean true CVR: the anti-correlated user-item affinities
    # alone make it negative; quality tied to appeal turns it positive
    assert apart < 0 < tied and tied > apart + 0.25, (tied, apart)


def test_world_params_overrides():
    from mtrec.data.synth import world_params

    p = world_params(["appeal_std=0.8", "rho-quality=0.8", "positions=5", "device_exam=1,0.5"])
    assert (p.appeal_std, p.rho_quality, p.positions, p.device_exam) == (0.8, 0.8, 5, (1.0, 0.5))
    assert world_params([]) == WorldParams()
    q = world_params(["quality_std=0.5"], "item_quality")  # the preset, then the overrides on top
    assert (q.appeal_std, q.quality_std, q.rho_quality, q.click_bias, q.buy_bias) == (1.0, 0.5, 0.8, -4.1, -3.6)
    for bad, msg in (
        (["nope=1"], r"--param 'nope=1': expected NAME=VALUE with NAME one of users, "),
        (["appeal_std"], r"--param 'appeal_std': expected NAME=VALUE"),
        (["positions=2.5"], r"--param 'positions=2.5': positions takes an integer"),
        (["appeal_std=high"], r"appeal_std takes a number"),
        (["rho_quality=1.5"], r"--param rho_quality=1.5: a correlation must lie in \[-1, 1\]"),
        (["users=-5"], r"--param users=-5: must be >= 1"),
        (["candidates=5"], r"--param candidates=5: must be >= positions \(10\)"),
        (["device_exam=1"], r"--param device_exam=1.0: needs 2 positive factors \(app, web\)"),
        (["appeal_std=nan"], r"--param appeal_std=nan: must be a finite number"),
        (["web_share=2"], r"--param web_share=2.0: a share must lie in \[0, 1\]"),
        (["quality_std=-1"], r"--param quality_std=-1.0: must be >= 0"),
    ):
        with pytest.raises(MtrecError, match=msg):
            world_params(bad)
    with pytest.raises(MtrecError, match=r"^--world 'x=1': expected NAME=VALUE"):  # the benches name their own flag
        world_params(["x=1"], flag="--world")
    with pytest.raises(MtrecError, match=r"^WorldParams positions=0: must be >= 1"):  # write_world checks too
        write_world("memory://never", days=1, rows_per_day=10, params=WorldParams(positions=0))


def test_default_world_is_pinned():
    """Figures throughout docs/ were measured on the default world: a change to the generator that
    moves it (a new random draw in the shared stream, a changed default) must be deliberate. These
    are the counts and id checksums the generator gave when the figures were measured."""
    import fsspec

    write_world("memory://pinned", days=2, rows_per_day=5000, seed=0)
    got = []
    for day in DAYS[:2]:
        t = ds.dataset(f"/pinned/dt={day}", filesystem=fsspec.filesystem("memory")).to_table()
        got.append(
            (
                int(t.column("click").to_numpy().sum()),
                int(t.column("conversion").to_numpy().sum()),
                int(t.column("item_id").to_numpy().sum() % 1_000_003),
                int(t.column("user_id").to_numpy().sum() % 1_000_003),
            )
        )
    assert got == [(248, 16, 608218, 52485), (284, 17, 928394, 367559)]


def test_synth_rewrite_replaces_the_world_and_refuses_foreign_folders(tmp_path):
    out = tmp_path / "w"
    write_world(str(out), days=1, rows_per_day=2000, seed=1, files_per_day=4)
    write_world(str(out), days=1, rows_per_day=1000, seed=2, files_per_day=2)
    assert sorted(p.name for p in (out / f"dt={DAY1}").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert pq.read_table(out / f"dt={DAY1}").num_rows == 1000
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(MtrecError, match="is not empty and holds no _world.json"):
        write_world(str(foreign), days=1, rows_per_day=10)
    assert (foreign / "keep.txt").exists()


HIST_COLUMNS = [
    "hist_item_id",
    "hist_item_category",
    "hist_brand",
    "hist_behavior",
    "hist_scenario",
    "hist_age_hours",
    "hist_price_bucket",
]
SMALL_SEQUENCES = ["users=300", "items=500", "history=16", "history_init=8"]  # the preset, small and fast


def _sequences_world(root: str, days: int = 3, rows: int = 3000, seed: int = 1, extra: tuple[str, ...] = ()) -> str:
    from mtrec.data.synth import world_params

    write_world(
        root, days=days, rows_per_day=rows, seed=seed, params=world_params([*SMALL_SEQUENCES, *extra], "sequences")
    )
    return root


@pytest.fixture(scope="module")
def seq_world(tmp_path_factory) -> str:
    return _sequences_world(str(tmp_path_factory.mktemp("seqworld")))


def test_default_world_writes_no_history_and_no_intent(world):
    assert not set(HIST_COLUMNS) & set(_day(world, DAYS[0]).column_names)
    assert "intent" not in _day(world, DAYS[0], True).column_names


def test_histories_are_the_users_earlier_behaviours_newest_last(seq_world):
    """Every row's history is its user's clicks (strongest action) of earlier requests, in time and
    position order, across files and days, kept newest last and cut to `history`; what comes before
    them is the past the user arrived with, of a fixed length per user."""
    t = pa.concat_tables([_day(seq_world, d) for d in DAYS])
    d = t.to_pydict()
    ts = t.column("ts").to_numpy().astype("int64")
    assert np.all(np.diff(ts) >= 0)  # days and files in time order
    done: dict[int, list] = {}  # user -> behaviours of completed requests, oldest first
    arrived: dict[int, int] = {}  # user -> length of the past they arrived with
    category, brand = (
        dict(zip(d["item_id"], d["item_category"], strict=True)),
        dict(zip(d["item_id"], d["brand"], strict=True)),
    )
    pending, request = [], None
    for i in range(t.num_rows):
        if d["request_id"][i] != request:  # behaviours join the history once their request is over
            for user, b in pending:
                done.setdefault(user, []).append(b)
            pending, request = [], d["request_id"][i]
        user = d["user_id"][i]
        lists = [d[c][i] for c in HIST_COLUMNS]
        assert len({len(x) for x in lists}) == 1 and len(lists[0]) <= 16
        hist = list(zip(*lists[:2], lists[3], lists[4], strict=True))
        ages = d["hist_age_hours"][i]
        assert all(a >= b >= 0 for a, b in zip(ages, ages[1:], strict=False))  # oldest first
        assert all(1 <= b <= 3 for b in d["hist_behavior"][i]) and set(d["hist_scenario"][i]) <= {d["device"][i]}
        assert all(
            category.get(x, c) == c for x, c in zip(d["hist_item_id"][i], d["hist_item_category"][i], strict=True)
        )
        assert all(brand.get(x, b) == b for x, b in zip(d["hist_item_id"][i], d["hist_brand"][i], strict=True))
        mine = done.get(user, [])
        k = min(len(mine), len(hist))
        assert hist[len(hist) - k :] == mine[len(mine) - k :], i
        if len(hist) < 16:  # not cut yet: the arrival past + everything since
            assert arrived.setdefault(user, len(hist) - len(mine)) == len(hist) - len(mine)
        if d["click"][i]:
            kind = 3 if d["conversion"][i] else 2 if d["daction"][i] else 1
            pending.append((user, (d["item_id"][i], d["item_category"][i], kind, d["device"][i])))
    assert np.mean(list(arrived.values())) > 4  # users arrive with a past (history_init = 8)


def test_intent_moves_the_true_click_probability_and_changes_over_visits(seq_world):
    from mtrec.data.synth import world_params

    params = world_params([], "sequences")
    strength, stickiness = params.intent_strength, params.intent_stickiness
    t = pa.concat_tables([_day(seq_world, d) for d in DAYS])
    tr = pa.concat_tables([_day(seq_world, d, True) for d in DAYS])
    match = t.column("item_category").to_numpy() == tr.column("intent").to_numpy()
    p = tr.column("p_click_unbiased").to_numpy().astype(np.float64)
    assert 0.05 < match.mean() < 0.95
    logit = np.log(p / (1 - p))
    assert logit[match].mean() > logit[~match].mean() + strength / 2, (logit[match].mean(), logit[~match].mean())
    # the intent is not the user's: between two requests of a user it is redrawn with probability
    # 1 - stickiness, and then lands on another category unless it draws the same again
    first = np.unique(t.column("request_id").to_numpy(), return_index=True)[1]
    first.sort()
    users, intents = t.column("user_id").to_numpy()[first], tr.column("intent").to_numpy()[first]
    order = np.argsort(users, kind="stable")
    same_user = users[order][1:] == users[order][:-1]
    changed = (intents[order][1:] != intents[order][:-1])[same_user]
    freq = np.bincount(intents) / intents.size
    expected = (1 - stickiness) * (1 - np.sum(freq**2))
    sd = np.sqrt(expected * (1 - expected) / changed.size)
    assert changed.size > 300 and abs(changed.mean() - expected) < 4 * sd, (changed.mean(), expected)
    # ... and the history shows it: the last behaviour's category is the intent far more often than
    # it would be by chance (were last categories and intents paired at random)
    last = np.array([h[-1] if h else -1 for h in t.column("hist_item_category").to_pylist()])[first]
    cats = np.arange(max(last.max(), intents.max()) + 1)
    chance = np.sum([(last == c).mean() * (intents == c).mean() for c in cats])
    assert (last == intents).mean() > 1.5 * chance, ((last == intents).mean(), chance)


def test_sequences_world_is_deterministic_and_prefix_stable(tmp_path):
    a, b, c = (
        _sequences_world(str(tmp_path / n), days=days, rows=1500, seed=seed)
        for n, days, seed in (("a", 2, 5), ("b", 3, 5), ("c", 2, 6))
    )
    for day in DAYS[:2]:
        assert _day(a, day).equals(_day(b, day)) and _day(a, day, True).equals(_day(b, day, True))
        assert not _day(a, day).equals(_day(c, day))


def test_sequence_params_are_checked():
    from mtrec.data.synth import world_params

    for bad, msg in (
        (["history=-1"], r"history=-1: must be >= 0"),
        (["history=10", "history_init=8"], r"history_init=8: a user's initial past .* must fit in history \(10\)"),
        (["intent_candidates=31"], r"intent_candidates=31: must be <= candidates \(30\)"),
        (["intent_stickiness=1.5"], r"intent_stickiness=1.5: a share must lie in \[0, 1\]"),
        (["intent_strength=-1"], r"intent_strength=-1.0: must be >= 0"),
        (["history_gap_hours=0"], r"history_gap_hours=0.0: must be > 0"),
    ):
        with pytest.raises(MtrecError, match=msg):
            world_params(bad)


def test_history_alone_only_adds_columns_and_intent_retrieval_shows_the_intent(tmp_path):
    """History draws from streams of its own: without an intent, the world is the default world
    plus the hist_* columns. Intents work without history too; retrieving candidates from the
    intent's category puts it on more rows."""
    plain, hist = str(tmp_path / "plain"), str(tmp_path / "hist")
    write_world(plain, days=2, rows_per_day=3000, seed=3)
    write_world(hist, days=2, rows_per_day=3000, seed=3, params=WorldParams(history=8, history_init=4))
    for day in DAYS[:2]:
        a, b = _day(plain, day), _day(hist, day)
        assert b.column_names == a.column_names + HIST_COLUMNS and b.select(a.column_names).equals(a)
        assert _day(plain, day, True).equals(_day(hist, day, True))

    def intent_share(candidates: int) -> float:
        root = str(tmp_path / f"i{candidates}")
        write_world(
            root,
            days=1,
            rows_per_day=5000,
            seed=3,
            params=WorldParams(intent_strength=1.0, intent_candidates=candidates),
        )
        t, tr = _day(root, DAYS[0]), _day(root, DAYS[0], True)
        assert not set(HIST_COLUMNS) & set(t.column_names)
        return (t.column("item_category").to_numpy() == tr.column("intent").to_numpy()).mean()

    assert intent_share(10) > intent_share(0) + 0.2


def test_alias_sampler_draws_in_proportion_to_the_weights():
    from mtrec.data.synth import _Alias

    w = np.array([1.0, 2.0, 3.0, 4.0, 0.0, 10.0])
    n = 200_000
    freq = np.bincount(_Alias(w).draw(np.random.default_rng(0), (n,)), minlength=w.size) / n
    p = w / w.sum()
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-12), (freq, p)


def test_purchasing_power_is_a_user_level_label_with_its_truth(tmp_path):
    """The power label: one level per user on all of their rows, equally likely levels, the truth
    a distribution over levels that the label follows; without `power_effect` nothing else moves,
    with it the user's history leans towards dearer items as the level rises."""
    root = str(tmp_path / "pp")
    extra = ["power_levels=5", "power_effect=0.6"]
    write_world(root, days=2, rows_per_day=20_000, seed=2, params=world_params([*SMALL_SEQUENCES, *extra]))
    logs, truth = _day(root, DAYS[1]), _day(root, DAYS[1], True)
    level = logs.column("power_level").to_numpy()
    per_user = {}
    for u, lv in zip(logs.column("user_id").to_pylist(), level.tolist(), strict=True):
        assert per_user.setdefault(u, lv) == lv
    shares = np.bincount(list(per_user.values()), minlength=5) / len(per_user)
    assert shares.min() > 0.1 and shares.max() < 0.3  # 300 users, 5 levels of 20%
    p = np.stack([truth.column(f"power_level_p{k}").to_numpy() for k in range(5)], axis=1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert p[np.arange(len(level)), level].mean() > 1.5 / 5  # the label follows its truth
    hist = logs.column("hist_price_bucket").to_pylist()
    mean_price = np.array([np.mean(h) if h else np.nan for h in hist])
    seen = ~np.isnan(mean_price)
    assert np.corrcoef(mean_price[seen], level[seen])[0, 1] > 0.3

    flat = str(tmp_path / "flat")
    write_world(flat, days=1, rows_per_day=3000, seed=2, params=world_params([*SMALL_SEQUENCES, "power_levels=5"]))
    base = str(tmp_path / "base")
    write_world(base, days=1, rows_per_day=3000, seed=2, params=world_params(SMALL_SEQUENCES))
    a, b = _day(base, DAYS[0]), _day(flat, DAYS[0])
    assert b.column_names == [*a.column_names, "power_level"] and b.select(a.column_names).equals(a)
    with pytest.raises(MtrecError, match=r"power_levels=1: a label needs >= 2 levels"):
        world_params(["power_levels=1"])


def test_day_cycle_writes_the_day_hour_by_hour_and_the_mix_moves_with_the_hour(tmp_path):
    """Preset day_cycle: 24 files a day in time order; web traffic peaks at noon and app traffic in
    the evening, and the categories shown at 3:00 are not those shown at 15:00, where the default
    world's hours are alike."""
    cyc, plain = str(tmp_path / "cycle"), str(tmp_path / "plain")
    write_world(cyc, days=1, rows_per_day=48_000, seed=2, params=world_params([], "day_cycle"))
    write_world(plain, days=1, rows_per_day=48_000, seed=2, files_per_day=24)
    files = sorted(Path(cyc, f"dt={DAY1}").glob("part-*.parquet"))
    assert len(files) == 24
    hours = [pq.read_table(f) for f in files]
    for h, t in enumerate(hours):  # file h holds hour h, in time order
        ts = t.column("ts").to_numpy().astype("datetime64[ms]") - np.datetime64(f"{DAY1}T00:00", "ms")
        ts = ts.astype(np.int64) / 3_600_000
        assert (h <= ts).all() and (ts < h + 1).all() and (np.diff(ts) >= 0).all()
    web = np.array([np.mean(t.column("device").to_numpy()) for t in hours])
    assert web[10:15].mean() > 2 * web[19:23].mean()  # web at noon, app in the evening

    def spread(root: str) -> float:  # total variation between the categories shown at 3:00 and 15:00
        parts = sorted(Path(root, f"dt={DAY1}").glob("part-*.parquet"))
        a, b = (np.bincount(pq.read_table(parts[h]).column("item_category").to_numpy(), minlength=100) for h in (3, 15))
        return 0.5 * np.abs(a / a.sum() - b / b.sum()).sum()

    assert spread(cyc) > 0.3 > 0.15 > spread(plain)
    # without the cycle its other parameters do nothing: the world is the default one (which is pinned)
    off = world_params(["cycle_strength=0", "web_peak_hour=3", "app_peak_hour=7"])
    write_world(str(tmp_path / "off"), days=1, rows_per_day=4_000, seed=2, params=off)
    write_world(str(tmp_path / "default"), days=1, rows_per_day=4_000, seed=2)
    assert _day(str(tmp_path / "off"), DAY1).equals(_day(str(tmp_path / "default"), DAY1))
    with pytest.raises(MtrecError, match=r"app_peak_hour=24.0: an hour of the day lies in \[0, 24\)"):
        world_params(["app_peak_hour=24"], "day_cycle")


def test_sort_by_writes_the_same_rows_sorted_across_the_days_files(tmp_path):
    plain, by_click = str(tmp_path / "plain"), str(tmp_path / "sorted")
    write_world(plain, days=1, rows_per_day=6_000, seed=4)
    write_world(by_click, days=1, rows_per_day=6_000, seed=4, export=Export(sort_by="click"))
    files = sorted(Path(by_click, f"dt={DAY1}").glob("part-*.parquet"))
    sizes = [pq.read_metadata(f).num_rows for f in files]
    assert sizes == [pq.read_metadata(f).num_rows for f in sorted(Path(plain, f"dt={DAY1}").glob("part-*.parquet"))]
    read = pa.concat_tables([pq.read_table(f) for f in files])  # in file order
    click = read.column("click").to_numpy()
    assert (np.diff(click) >= 0).all() and 0 < click.mean() < 1  # non-clicks, then clicks, across files
    key = [("row_id", "ascending")]
    assert read.sort_by(key).equals(_day(plain, str(DAY1)).sort_by(key))  # the same rows
    assert _day(by_click, str(DAY1), True).equals(_day(plain, str(DAY1), True))  # the truth as it was
    assert read_world(by_click)["sort_by"] == "click"
    # a bad column is refused before anything is written: the world already there stays
    before = sorted(p.name for p in Path(by_click).rglob("*"))
    with pytest.raises(MtrecError, match=r"--sort-by 'item_tags': not a column the world writes; choose one of row_id"):
        write_world(by_click, days=1, rows_per_day=100, export=Export(sort_by="item_tags"))
    assert sorted(p.name for p in Path(by_click).rglob("*")) == before and read_world(by_click)["sort_by"] == "click"
    with pytest.raises(
        MtrecError, match=r"--candidates .*/sorted/cands overlaps --out .*/sorted; write the candidates"
    ):
        write_world(by_click, days=1, rows_per_day=100, export=Export(candidates=f"{by_click}/cands"))


def test_candidates_are_what_each_request_scored_and_leave_the_logs_as_they_were(tmp_path):
    """Every request's `candidates` items, each with the request's user side (history included)
    and its own item features, no labels and no position; the shown ones are exactly the logged
    impressions; the truth says which were shown and how relevant each was. The logs are the same
    with or without candidates."""
    logs, cands, plain = str(tmp_path / "logs"), str(tmp_path / "cands"), str(tmp_path / "plain")
    params = world_params(["users=2000"], "sequences")
    write_world(logs, days=2, rows_per_day=3_000, seed=3, params=params, export=Export(candidates=cands))
    write_world(plain, days=2, rows_per_day=3_000, seed=3, params=params)
    day = DAYS[1]
    assert _day(logs, day).equals(_day(plain, day)) and _day(logs, day, True).equals(_day(plain, day, True))
    c, t = _day(cands, day), _day(cands, day, True)
    assert c.num_rows == t.num_rows == 3_000 // 10 * 30 and c.column("row_id").equals(t.column("row_id"))
    assert not {"click", "conversion", "position", "daction", "watch_time"} & set(c.column_names)
    shown = c.filter(t.column("shown"))
    logged = _day(logs, day)
    key = ["request_id", "item_id", "user_id", "user_segment", "hist_item_id", "item_category", "user_activity"]
    key += ["item_popularity"]  # observed once: a shown candidate's features are its impression's
    order = [(c, "ascending") for c in ("request_id", "item_id", "user_activity", "item_popularity")]
    assert shown.select(key).sort_by(order).equals(logged.select(key).sort_by(order))
    # the policy shows the more relevant candidates: the serving population is not the logged one
    rel, is_shown = t.column("p_click_unbiased").to_numpy(), t.column("shown").to_numpy()
    assert rel[is_shown].mean() > 1.5 * rel[~is_shown].mean()
    assert read_world(cands)["candidates"] == cands
