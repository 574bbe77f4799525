"""Paired statistics against values computed by hand: McNemar's exact p from binomial sums, the bootstrap
interval on constructed samples, the normal interval of a mean."""
import math

import numpy as np
import pytest

from workbench.evaluation.paired import binomial_two_sided_p, mcnemar_exact, mean_interval, paired_bootstrap


def test_binomial_p_by_hand():
    # 1 of 10 discordant pairs one way: 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024.
    assert binomial_two_sided_p(1, 10) == pytest.approx(22 / 1024)
    assert binomial_two_sided_p(9, 10) == pytest.approx(22 / 1024)
    # 0 of 5: 2 / 32; an even split is 1 (capped); no discordant pair is 1.
    assert binomial_two_sided_p(0, 5) == pytest.approx(2 / 32)
    assert binomial_two_sided_p(3, 6) == 1.0 and binomial_two_sided_p(0, 0) == 1.0


def test_mcnemar_counts_only_discordant_pairs():
    a = [1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0]
    b = [0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0]  # a alone: 6, b alone: 1
    result = mcnemar_exact(a, b)
    assert (result["a_only"], result["b_only"], result["n"]) == (6, 1, 12)
    assert result["p"] == pytest.approx(2 * (1 + 7) / 2 ** 7)  # 16/128 = 0.125
    assert mcnemar_exact([0] * 12, [0] * 12)["p"] == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        mcnemar_exact([1, 0], [1])


def test_paired_bootstrap_covers_the_true_difference():
    rng = np.random.default_rng(7)
    shared = rng.normal(3.0, 1.0, 400)  # item difficulty, common to both models: the pairing removes it
    a = shared + rng.normal(0.0, 0.1, 400) - 0.2
    b = shared + rng.normal(0.0, 0.1, 400)
    result = paired_bootstrap(a, b)
    assert result["n"] == 400 and result["low"] < -0.2 < result["high"]
    assert result["difference"] == pytest.approx(float(np.mean(a - b)))
    assert result["high"] - result["low"] < 0.05  # far narrower than the unpaired spread (sd 1)
    assert paired_bootstrap(a, b) == result  # fixed seed: the same interval on a rerun
    zero = paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (zero["difference"], zero["low"], zero["high"]) == (0.0, 0.0, 0.0)


def test_mean_interval_is_the_normal_interval():
    values = [1.0, 2.0, 3.0, 4.0]
    result = mean_interval(values)
    half = 1.959963984540054 * math.sqrt(5 / 3) / 2  # sample sd sqrt(5/3), sqrt(n) = 2
    assert result == pytest.approx({"mean": 2.5, "low": 2.5 - half, "high": 2.5 + half, "n": 4})
    assert math.isnan(mean_interval([1.0])["low"]) and mean_interval([])["n"] == 0
