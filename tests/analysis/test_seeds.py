"""Seed consistency: the Hungarian matching of two decoders against brute force and known answers."""

import itertools

import numpy as np
import pytest

from saev_core.analysis import seeds


def test_matching_is_the_best_one_to_one_pairing_by_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    best = max(sum(cos[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    got = seeds.matched_cosines(a, b)
    assert got.sum() == pytest.approx(best) and len(got) == 5


def test_a_permuted_rescaled_copy_matches_perfectly_and_random_atoms_do_not():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(64, 32))
    b = a[rng.permutation(64)] * rng.uniform(0.5, 2, size=(64, 1))
    same = seeds.consistency(a, b, other_seed=7, other_ckpt="x")
    assert same.mean_cos == pytest.approx(1.0) and same.frac_above_0_9 == 1.0 and same.other_seed == 7
    other = seeds.consistency(a, rng.normal(size=(64, 32)), 7, "x")
    assert other.mean_cos < 0.5 and other.frac_above_0_9 == 0.0


def test_decoders_of_different_widths_pair_the_smaller_one_and_different_d_vit_is_refused():
    rng = np.random.default_rng(2)
    assert len(seeds.matched_cosines(rng.normal(size=(3, 8)), rng.normal(size=(6, 8)))) == 3
    with pytest.raises(ValueError, match="same d_vit"):
        seeds.matched_cosines(rng.normal(size=(3, 8)), rng.normal(size=(3, 9)))
