"""The Wilson score interval against values worked out by hand from its closed form."""
import pytest

from utils.intervals import wilson_interval

# z = 1.959964 (the normal quantile of 0.975), z^2 = 3.841459.


def test_none_of_n_and_all_of_n():
    # p = 0: low = 0, high = z^2 / (n + z^2) = 3.841459 / 18.841459 = 0.203883 (n = 15).
    assert wilson_interval(0, 15) == (0.0, pytest.approx(0.203883, abs=1e-6))
    # p = 1: low = n / (n + z^2) = 15 / 18.841459 = 0.796117, high = 1.
    assert wilson_interval(15, 15) == (pytest.approx(0.796117, abs=1e-6), 1.0)


def test_a_middle_case():
    # 3 of 15 (val's position row at 20 %): p = 0.2, 1 + z^2/n = 1.256097,
    # centre = (0.2 + z^2/30) / 1.256097 = (0.2 + 0.128049) / 1.256097 = 0.261165,
    # half-width = z / 1.256097 * sqrt(0.2 * 0.8 / 15 + z^2 / 900) = 1.560361 * sqrt(0.014935) = 0.190689,
    # so [0.070475, 0.451854]: 6.7 points per expression, and the interval spans 38 points.
    low, high = wilson_interval(3, 15)
    assert low == pytest.approx(0.070475, abs=2e-6)
    assert high == pytest.approx(0.451854, abs=2e-6)


def test_mirror_image_and_a_wider_level():
    low, high = wilson_interval(12, 15)
    assert (1 - high, 1 - low) == pytest.approx(wilson_interval(3, 15))
    low99, high99 = wilson_interval(3, 15, confidence=0.99)
    assert low99 < 0.070475 and high99 > 0.451854


@pytest.mark.parametrize("successes, n, message", [
    (0, 0, "at least one trial"), (5, 4, "between 0 and n = 4"), (-1, 4, "between 0 and n = 4")])
def test_impossible_counts_are_refused(successes, n, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(successes, n)
