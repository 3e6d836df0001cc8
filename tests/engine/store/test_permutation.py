import numpy as np
import pytest

from engine.store.permutation import FeistelPermutation


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097, 65536])
def test_is_a_bijection_of_the_range(n):
    y = FeistelPermutation(n, seed=3)(np.arange(n))
    assert np.array_equal(np.sort(y), np.arange(n))


def test_deterministic_per_seed_and_differs_across_seeds():
    x = np.arange(10_000)
    a, b, c = FeistelPermutation(10_000, 0)(x), FeistelPermutation(10_000, 0)(x), FeistelPermutation(10_000, 1)(x)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, x)


def test_pointwise_evaluation_matches_whole_range():
    p = FeistelPermutation(12_345, 7)
    whole = p(np.arange(12_345))
    idx = np.array([0, 5, 12_344, 999])
    assert np.array_equal(p(idx), whole[idx])
    with pytest.raises(IndexError):
        p(np.array([12_345]))
