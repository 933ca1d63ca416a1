import pytest

from mtrec import retry as retry_mod
from mtrec.retry import retry


@pytest.fixture
def waits(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(retry_mod.time, "sleep", slept.append)
    return slept


def flaky(errors: list[Exception]):
    calls = []

    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return len(calls)

    return fn


def test_transient_errors_are_retried_with_growing_waits(waits):
    assert retry(flaky([ConnectionError("a"), ConnectionError("b")]), 3, 1.0, lambda e: True) == 3
    assert waits == [1.0, 2.0]
    waits.clear()
    assert retry(flaky([TimeoutError()] * 3), 4, 2.0, lambda e: True, factor=1.0) == 4
    assert waits == [2.0, 2.0, 2.0]


def test_the_last_or_a_permanent_error_is_raised_as_is(waits):
    with pytest.raises(ConnectionError, match="c"):
        retry(flaky([ConnectionError("a"), ConnectionError("b"), ConnectionError("c")]), 3, 0.5, lambda e: True)
    assert waits == [0.5, 1.0]  # no wait after the last try
    waits.clear()
    with pytest.raises(ValueError, match="bad"):
        retry(flaky([ValueError("bad"), ConnectionError()]), 5, 0.5, lambda e: isinstance(e, ConnectionError))
    assert waits == []
    with pytest.raises(ValueError, match="at least one try"):
        retry(lambda: 1, 0, 1.0, lambda e: True)
