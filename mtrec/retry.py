"""Retry with backoff: the loop behind calls to a service that may be away for a while (MLflow,
the Ray job server). What counts as transient, and the message once it gives up, stay with the
caller.

Example:
    >>> retry(lambda: client.get_job_info(sid), tries=31, backoff_s=2.0, transient=lambda e: "404" not in str(e),
    ...       factor=1.0)   # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retry(
    fn: Callable[[], T], tries: int, backoff_s: float, transient: Callable[[Exception], bool], factor: float = 2.0
) -> T:
    """`fn()`, called up to `tries` times while it raises an exception `transient` accepts:
    `backoff_s` seconds before the second call, the wait multiplied by `factor` after each.

    Raises:
        Exception: the first exception `transient` refuses, or the last one, as `fn` raised it.
        ValueError: `tries` is below 1.
    """
    if tries < 1:
        raise ValueError(f"retry needs at least one try, got tries={tries}")
    wait = backoff_s
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == tries or not transient(e):
                raise
        time.sleep(wait)
        wait *= factor
    raise AssertionError("unreachable")
