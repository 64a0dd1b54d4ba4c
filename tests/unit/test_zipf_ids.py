"""The benchmark's popularity-skewed ids (``ops.demo.ZipfIds``): the skew asked for, ids in
range and distinct per rank, and the uniform requests unchanged by the option."""

from __future__ import annotations

import numpy as np
import pytest

from mpsserve.ops.demo import ID_MAX, DemoSpec, ZipfIds, make_request, rank_to_id

SPEC = DemoSpec(table_rows=1000)


def test_the_hottest_ids_take_the_share_zipf_predicts() -> None:
    ids = ZipfIds(1_000_000, exponent=1.05)
    draws = ids.draw(np.random.default_rng(0), 1_000_000)
    counts = np.sort(np.unique(draws, return_counts=True)[1])[::-1]
    for top in (10, 1_000, 10_000):
        observed = counts[:top].sum() / len(draws)
        assert observed == pytest.approx(ids.share_of_top(top), abs=0.01), top
    assert ids.share_of_top(10_000) > 0.7  # a cache of 1% of the ids serves most lookups


def test_ranks_map_to_distinct_ids_inside_the_id_space() -> None:
    ranks = np.arange(0, 3_000_000)
    ids = rank_to_id(ranks)
    assert ids.dtype == np.int64 and len(np.unique(ids)) == len(ranks)
    assert ids.min() >= 0 and ids.max() < ID_MAX
    assert rank_to_id(np.array([ID_MAX - 2])).item() < ID_MAX  # the last rank still fits
    assert not np.array_equal(ids[:100], np.arange(100))  # hot ids are scattered


def test_zipf_requests_are_valid_and_reproducible() -> None:
    ids = ZipfIds(50_000)
    a, b = (make_request(SPEC, 500, seed=4, ids=ids) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["cat"].shape == (500, SPEC.n_cat)
    assert len(a["history_values"]) == a["history_lengths"].sum()
    assert len(np.unique(a["cat"])) < a["cat"].size / 2  # repeats, as popular ids do


def test_uniform_requests_are_what_they_were() -> None:
    """Seeds name requests in tests and benchmarks: the option must not move them."""
    request = make_request(SPEC, 300, seed=9)
    rng = np.random.default_rng(9)
    lengths = rng.integers(1, 2 * SPEC.history_mean, 300, dtype=np.int64)
    rng.standard_normal((300, SPEC.n_dense), dtype=np.float32)
    assert np.array_equal(request["cat"], rng.integers(0, ID_MAX, (300, SPEC.n_cat)))
    assert np.array_equal(request["history_values"], rng.integers(0, ID_MAX, lengths.sum()))


@pytest.mark.parametrize(("distinct", "exponent"), [(0, 1.0), (ID_MAX + 1, 1.0), (10, 0.0)])
def test_bad_parameters_are_refused(distinct: int, exponent: float) -> None:
    with pytest.raises(ValueError, match="distinct"):
        ZipfIds(distinct, exponent)
