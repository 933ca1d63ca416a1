import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from mtrec.eval.metrics import (
    auc,
    binary_report,
    calibration,
    gauc,
    log_loss,
    mse,
    normalized_entropy,
    pearson,
)

rng = np.random.default_rng(0)
N = 5000
pred = rng.random(N)
label = (rng.random(N) < pred).astype(float)
pred_ties = np.round(pred, 1)  # many ties


@pytest.mark.parametrize("p", [pred, pred_ties])
def test_auc_matches_sklearn(p):
    assert auc(p, label) == pytest.approx(roc_auc_score(label, p), abs=1e-12)
    w = rng.random(N)
    assert auc(p, label, w) == pytest.approx(roc_auc_score(label, p, sample_weight=w), abs=1e-12)


def test_soft_label_auc_equals_duplicated_rows():
    soft = rng.random(N)  # true CVR of each impression
    dup_y = np.concatenate([np.ones(N), np.zeros(N)])
    dup_w = np.concatenate([soft, 1 - soft])
    expected = roc_auc_score(dup_y, np.concatenate([pred, pred]), sample_weight=dup_w)
    assert auc(pred, soft) == pytest.approx(expected, abs=1e-12)
    assert auc(soft, soft) > auc(pred, soft)  # the oracle is the ceiling


def test_gauc_is_impression_weighted_per_user_auc():
    users = rng.integers(0, 40, N)
    users[:30] = 999  # one user with a single class: skipped
    label2 = label.copy()
    label2[users == 999] = 1
    expected_num = expected_den = 0.0
    for u in np.unique(users):
        m = users == u
        if 0 < label2[m].sum() < m.sum():
            expected_num += m.sum() * roc_auc_score(label2[m], pred_ties[m])
            expected_den += m.sum()
    assert gauc(pred_ties, label2, users) == pytest.approx(expected_num / expected_den, abs=1e-12)


def test_log_loss_ne_calibration():
    assert log_loss(pred, label) == pytest.approx(sk_log_loss(label, pred), abs=1e-9)
    base = label.mean()
    assert normalized_entropy(np.full(N, base), label) == pytest.approx(1.0, abs=1e-9)
    assert normalized_entropy(pred, label) < 1.0
    assert calibration(pred, label) == pytest.approx(pred.sum() / label.sum())
    assert np.isnan(auc(pred, np.zeros(N)))


def test_metrics_on_empty_input_are_nan():
    e = np.array([])
    assert np.isnan(auc(e, e)) and np.isnan(gauc(e, e, e))
    report = binary_report(e, e, e)
    assert report["rows"] == report["positives"] == 0
    assert all(np.isnan(v) for k, v in report.items() if k not in ("rows", "positives"))


def test_a_one_class_slice_has_no_ne_like_it_has_no_auc():
    """Its base entropy is 0: NE would be log loss / ~1e-6 (it read ~4.5e5), not a figure."""
    for y in (np.zeros(N), np.ones(N)):
        assert np.isnan(normalized_entropy(pred, y)) and np.isnan(auc(pred, y))
    assert np.isnan(calibration(pred, np.zeros(N)))  # no positive to calibrate against


def test_every_figure_of_a_one_class_slice_that_divides_by_its_labels_is_nan():
    """Positives only, negatives only, float32 labels as the logs give them, soft labels of one
    class: AUC, GAUC, NE and calibration are nan (on positives alone calibration would read the mean
    prediction, 0.5, whatever the model); log loss, rows and positives stay figures."""
    users = np.arange(N) % 50
    for y in (np.zeros(N, np.float32), np.ones(N, np.float32), np.zeros(N)):
        r = binary_report(pred, y, users)
        assert [k for k, v in r.items() if np.isnan(v)] == ["auc", "ne", "calibration", "gauc"], y[:1]
        assert r["rows"] == N and r["positives"] == y.sum()
        assert r["log_loss"] == pytest.approx(sk_log_loss(y, pred, labels=[0, 1]), abs=1e-9)
    assert pred.mean() == pytest.approx(0.5, abs=0.01)  # what calibration on positives alone would have read
    # one positive among N is two classes: a figure, however large the NE
    one = np.zeros(N)
    one[7] = 1
    assert np.isfinite(normalized_entropy(pred, one)) and calibration(pred, one) == pytest.approx(pred.sum())


def test_regression_figures_are_nan_where_the_slice_cannot_give_them():
    x = rng.normal(size=200)
    y = 2 * x + rng.normal(size=200)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert mse(x, y) == pytest.approx(np.mean((x - y) ** 2), abs=1e-12)
    with np.errstate(all="raise"):  # no division warning on the way to nan
        assert np.isnan(pearson(x, np.full(200, 3.0)))  # a constant target has no standard deviation
        assert np.isnan(pearson(np.full(200, 0.1), y))
        assert np.isnan(pearson(x[:1], y[:1])) and np.isnan(mse(x[:0], y[:0]))


def test_multiclass_report_matches_sklearn():
    from sklearn.metrics import accuracy_score

    from mtrec.eval.metrics import macro_auc, multiclass_report

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(500, 4))
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 4, 500)
    rep = multiclass_report(prob, y)
    assert rep["accuracy"] == pytest.approx(accuracy_score(y, prob.argmax(axis=1)))
    assert rep["macro_auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert rep["log_loss"] == pytest.approx(sk_log_loss(y, prob, labels=[0, 1, 2, 3]))
    # a class that never occurs is left out of the macro average, as scikit-learn cannot score it
    y3 = np.where(y == 3, 0, y)
    expected = np.mean([roc_auc_score(y3 == k, prob[:, k]) for k in range(3)])
    assert macro_auc(prob, y3) == pytest.approx(expected)
    # soft labels: each row counts once per class with the class's probability as its weight
    soft = np.eye(4)[y]
    assert macro_auc(prob, soft) == pytest.approx(rep["macro_auc"])
    assert np.isnan(multiclass_report(prob[:0], y[:0])["macro_auc"])
