"""The randomised PCA behind 02's feature map agrees with a full SVD on the leading components (up to sign)."""
import numpy as np

from emclip.evaluation.maps import principal_components


def test_leading_components_match_a_full_svd():
    rng = np.random.default_rng(0)
    n, d = 600, 300
    x = rng.normal(size=(n, d)) + 6 * np.outer(rng.normal(size=n), rng.normal(size=d)) \
        + 3 * np.outer(rng.normal(size=n), rng.normal(size=d)) + 5.0   # an offset: it must be centred away
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    ref = u[:, :2] * s[:2]
    got = principal_components(x, 2)
    for i in range(2):
        sign = np.sign(got[:, i] @ ref[:, i])
        np.testing.assert_allclose(sign * got[:, i], ref[:, i], rtol=1e-6, atol=1e-6 * np.abs(ref[:, i]).max())


def test_too_few_rows_give_zeros():
    assert principal_components(np.ones((2, 5)), 2).shape == (2, 2)
