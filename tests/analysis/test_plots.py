"""The pictures' helpers: the PCA baseline's span beside a sweep."""

from saev_core.analysis import plots


def test_the_pca_curve_spans_one_and_a_half_times_the_largest_l0():
    nmse = [0.9, 0.8, 0.7, 0.6, 0.5]
    assert plots.pca_curve(nmse, 2.0) == ([1, 2, 3], [0.9, 0.8, 0.7])
    assert plots.pca_curve(nmse, 0.2) == ([1], [0.9])  # at least one component
    assert plots.pca_curve(nmse, 40.0) == ([1, 2, 3, 4, 5], nmse)  # no more than there are
