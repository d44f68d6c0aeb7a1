"""Back-off with full jitter, and reading an upstream's Retry-After header."""

from __future__ import annotations

import random
import statistics
from email.utils import formatdate

import pytest

from sidecar.resilience.backoff import (
    MAX_RETRY_AFTER,
    Backoff,
    backoff_delay,
    exponential_ceiling,
    jittered,
    parse_retry_after,
)

# -- backoff_delay --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_number", "ceiling"),
    [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (6, 0.25)],
)
def test_ceiling_doubles_until_the_cap(retry_number: int, ceiling: float) -> None:
    # rand() -> 1.0 is outside [0, 1) but exposes the ceiling exactly
    assert backoff_delay(retry_number, 0.025, 0.25, rand=lambda: 1.0) == pytest.approx(ceiling)
    assert backoff_delay(retry_number, 0.025, 0.25, rand=lambda: 0.0) == 0.0


def test_delays_stay_within_bounds() -> None:
    rng = random.Random(7)
    for retry_number in range(1, 50):
        delay = backoff_delay(retry_number, 0.025, 0.25, rand=rng.random)
        assert 0.0 <= delay < min(0.25, 0.025 * 2 ** (retry_number - 1))


def test_full_jitter_spreads_over_the_whole_interval() -> None:
    rng = random.Random(1234)
    delays = [backoff_delay(10, 0.1, 1.0, rand=rng.random) for _ in range(5000)]
    assert min(delays) < 0.02
    assert max(delays) > 0.98
    assert statistics.mean(delays) == pytest.approx(0.5, abs=0.03)
    # each tenth of the interval gets roughly a tenth of the draws
    deciles = [0] * 10
    for d in delays:
        deciles[int(d * 10)] += 1
    assert all(400 <= count <= 600 for count in deciles)


@pytest.mark.parametrize("retry_number", [1025, 10**6, 10**100])
def test_huge_retry_numbers_do_not_overflow(retry_number: int) -> None:
    assert backoff_delay(retry_number, 0.025, 0.25, rand=lambda: 0.5) == pytest.approx(0.125)


def test_retry_numbers_start_at_one() -> None:
    with pytest.raises(ValueError):
        backoff_delay(0, 0.025, 0.25)


def test_zero_base_or_cap_means_no_wait() -> None:
    assert backoff_delay(3, 0.0, 0.25) == 0.0
    assert backoff_delay(3, 0.025, 0.0) == 0.0


# -- Backoff: the failure streak of a background loop ---------------------------------------


def test_backoff_doubles_from_base_to_cap_and_resets() -> None:
    b = Backoff(0.1, 0.5, jitter="none")
    assert [b.next() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5, 0.5])
    assert b.failures == 6
    b.reset()
    assert b.failures == 0
    assert b.next() == pytest.approx(0.1)


def test_equal_jitter_stays_in_the_upper_half_of_the_ceiling() -> None:
    rng = random.Random(3)
    b = Backoff(0.1, 5.0, rand=rng.random)  # "equal" is the default
    for n in range(1, 30):
        ceiling = min(5.0, 0.1 * 2 ** (n - 1))
        delay = b.next()
        assert ceiling / 2 <= delay < ceiling
    assert Backoff(0.1, 5.0, rand=lambda: 0.0).delay(3) == pytest.approx(0.2)
    assert Backoff(0.1, 5.0, rand=lambda: 1.0).delay(3) == pytest.approx(0.4)


def test_delay_does_not_count_a_failure() -> None:
    b = Backoff(1.0, 30.0, jitter="none")
    assert b.delay(4) == 8.0
    assert b.failures == 0


def test_full_jitter_and_none() -> None:
    assert jittered(2.0, "full", rand=lambda: 0.25) == 0.5
    assert jittered(2.0, "none", rand=lambda: 0.25) == 2.0
    assert jittered(2.0, "equal", rand=lambda: 0.25) == 1.25


def test_exponential_ceiling_edges() -> None:
    assert exponential_ceiling(10**9, 0.5, 5.0) == 5.0  # no OverflowError
    assert exponential_ceiling(3, 0.0, 5.0) == 0.0
    with pytest.raises(ValueError):
        exponential_ceiling(0, 0.5, 5.0)


def test_a_long_streak_never_overflows() -> None:
    b = Backoff(0.1, 5.0, jitter="none", failures=10**6)
    assert b.next() == 5.0


# -- parse_retry_after ------------------------------------------------------------------------

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("120", 120.0), ("  7 ", 7.0), ("1.5", 1.5), ("086400", MAX_RETRY_AFTER)],
)
def test_delta_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize("value", ["99999999", "9" * 5000])
def test_huge_delta_seconds_are_clamped(value: str) -> None:
    assert parse_retry_after(value, now=NOW) == MAX_RETRY_AFTER


def test_imf_fixdate() -> None:
    value = formatdate(NOW + 30, usegmt=True)  # e.g. "Tue, 14 Nov 2023 22:13:50 GMT"
    assert parse_retry_after(value, now=NOW) == pytest.approx(30.0)


def test_obsolete_date_forms() -> None:
    rfc850 = "Sunday, 06-Nov-94 08:49:37 GMT"
    asctime = "Sun Nov  6 08:49:37 1994"
    imf = "Sun, 06 Nov 1994 08:49:37 GMT"
    epoch = 784111777.0  # 1994-11-06T08:49:37Z
    for value in (rfc850, asctime, imf):
        assert parse_retry_after(value, now=epoch - 10) == pytest.approx(10.0)


def test_a_date_in_the_past_means_now() -> None:
    assert parse_retry_after(formatdate(NOW - 60, usegmt=True), now=NOW) == 0.0


def test_a_date_far_ahead_is_clamped() -> None:
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now=NOW) == MAX_RETRY_AFTER


def test_the_default_now_is_the_current_time() -> None:
    import time

    delay = parse_retry_after(formatdate(time.time() + 3600, usegmt=True))
    assert delay is not None
    assert 3500 < delay <= 3600


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "-1",
        "+5",
        "soon",
        "1e3",
        "nan",
        "inf",
        "12 seconds",
        "0x10",
        "Mon, 99 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov",
    ],
)
def test_garbage_gives_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None
