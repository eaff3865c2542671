"""Evaluation: one predict function per config, shared by the stages and loads of a process."""

import jax
import numpy as np

from cnneb_jax.augment import normalize
from cnneb_jax.evaluation import exit_accuracies, make_predict_fn, predict_all
from cnneb_jax.model import backbone_forward, build_model, init_variables, split_collections


def test_one_predict_function_per_config_that_gives_each_exit_in_padded_batches(tiny_cfg):
    model = build_model(tiny_cfg)
    assert make_predict_fn(model) is make_predict_fn(build_model(tiny_cfg))
    other = build_model(tiny_cfg.replace(branch_points=("Mixed_5b", "Mixed_6e")))
    assert make_predict_fn(other) is not make_predict_fn(model)
    variables = init_variables(model, jax.random.PRNGKey(0))
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), np.uint8)
    out = predict_all(model, variables, images, 2)   # the last batch is padded
    params, stats = split_collections(variables)
    want, _, _ = backbone_forward(model, params, stats,
                                  normalize(images, tiny_cfg.input_norm), train=False)
    assert len(out["exits"]) == 2 and len(out["experts"]) == 1
    for got, ref in zip(out["exits"], want):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    labels = np.asarray(want[-1]).argmax(-1)
    assert exit_accuracies(out, labels)["O2"] == 1.0
