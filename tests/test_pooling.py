"""Pooling as strided slices gives what lax.reduce_window (Flax's pools) gives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnneb_jax.pooling import avg_pool, max_pool

CASES = [(3, 2, "VALID", 17), (3, 2, "SAME", 16), (3, 2, "SAME", 15), (3, 1, "SAME", 7),
         (5, 3, "VALID", 17), (3, 2, "VALID", 4), (3, 1, "SAME", 1)]


@pytest.mark.parametrize("k,s,padding,size", CASES)
def test_max_and_avg_pool_match_flax(k, s, padding, size):
    x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size + 1, 5))
    want = nn.max_pool(x, (k, k), strides=(s, s), padding=padding)
    np.testing.assert_array_equal(max_pool(x, k, s, padding), want)
    for include in (True, False):
        want = nn.avg_pool(x, (k, k), strides=(s, s), padding=padding,
                           count_include_pad=include)
        np.testing.assert_allclose(avg_pool(x, k, s, padding, include), want, rtol=1e-6,
                                   atol=1e-6)


def test_pool_gradients_match_flax():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 3))  # no ties: one max per window
    for ours, flax_pool in [(lambda x: max_pool(x, 3, 2, "SAME"),
                             lambda x: nn.max_pool(x, (3, 3), (2, 2), "SAME")),
                            (lambda x: avg_pool(x, 3, 1, "SAME", False),
                             lambda x: nn.avg_pool(x, (3, 3), (1, 1), "SAME", False))]:
        g = jax.grad(lambda x: jnp.sum(ours(x) ** 2))(x)
        want = jax.grad(lambda x: jnp.sum(flax_pool(x) ** 2))(x)
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


def test_bad_padding_is_refused():
    with pytest.raises(ValueError, match="SAME or VALID"):
        max_pool(jnp.zeros((1, 4, 4, 1)), 3, 2, "FULL")
