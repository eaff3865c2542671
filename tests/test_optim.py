"""Optimizers and weight averages: schedules, BatchNorm-offset lr, EMA, lookahead."""

import jax
import numpy as np


def test_update_ema_ramps_its_decay():
    from cnneb_jax.optim import init_ema, update_ema
    ema = init_ema({"w": jax.numpy.zeros(2)}, {"m": jax.numpy.zeros(2)})
    ema = update_ema(ema, {"w": jax.numpy.ones(2)}, {"m": jax.numpy.ones(2)}, 0.99)
    # First step: decay (1 + 0) / (10 + 0) = 0.1, so the average moves 90% of the way.
    np.testing.assert_allclose(ema["params"]["w"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(ema["stats"]["m"], 0.9, rtol=1e-6)
    for _ in range(2000):
        ema = update_ema(ema, {"w": jax.numpy.zeros(2)}, {"m": jax.numpy.zeros(2)}, 0.99)
    assert float(ema["count"]) == 2001 and float(ema["params"]["w"][0]) < 1e-6


def test_lookahead_resets_the_weights_to_the_average_on_its_steps_only():
    from cnneb_jax.optim import init_ema, lookahead
    jnp = jax.numpy
    ema = init_ema({"w": jnp.zeros(2)}, {"m": jnp.zeros(2)})
    step = lambda ema, w: lookahead(ema, {"w": jnp.full(2, w)}, {"m": jnp.full(2, w)},
                                    0.9, every=5, start_step=3, total_steps=10)
    # Before start_step the average is the weights.
    ema, p, s = step(ema, 1.0)
    assert float(ema["params"]["w"][0]) == 1.0 and float(p["w"][0]) == 1.0
    ema, p, s = step(ema, 1.0)
    ema, p, s = step(ema, 1.0)            # step 3: not a multiple of 5, both run free
    ema, p, s = step(ema, 2.0)            # step 4: the weights move, the average stays
    assert float(ema["params"]["w"][0]) == 1.0 and float(p["w"][0]) == 2.0
    ema, p, s = step(ema, 3.0)            # step 5: average 1 -> toward 3, weights reset
    rho = 0.9 ** 5 * (5 / 10) ** 3
    np.testing.assert_allclose(ema["params"]["w"], rho * 1.0 + (1 - rho) * 3.0, rtol=1e-6)
    np.testing.assert_allclose(p["w"], ema["params"]["w"])
    np.testing.assert_allclose(s["m"], ema["stats"]["m"])
    assert float(ema["count"]) == 5


def test_lr_start_and_end_set_the_ends_of_the_triangle():
    from cnneb_jax.optim import make_optimizer
    params = {"w": jax.numpy.zeros(1)}
    grads = {"w": jax.numpy.ones(1)}
    tx = make_optimizer(1.0, 10, 3, 0.0, 0.0, start=0.2, end=0.07)
    state, moves = tx.init(params), []
    for _ in range(10):
        updates, state = tx.update(grads, state, params)
        moves.append(-float(updates["w"][0]))
    # Up from 0.2 over 3 steps, then down toward 0.07, reached at step 10.
    np.testing.assert_allclose([moves[0], moves[3], moves[9]], [0.2, 1.0, 1 - 0.93 * 6 / 7],
                               rtol=1e-6)


def test_bn_bias_lr_mult_scales_only_batchnorm_offsets(tiny_cfg):
    from cnneb_jax.optim import backbone_optimizer
    params = {"seg": {"conv": {"kernel": jax.numpy.ones((3, 3))},
                      "bn": {"bias": jax.numpy.ones(3)}},
              "head": {"Logits": {"bias": jax.numpy.ones(3)}}}
    grads = jax.tree_util.tree_map(jax.numpy.ones_like, params)
    moves = {}
    for mult in (1.0, 8.0):
        cfg = tiny_cfg.replace(bn_bias_lr_mult=mult, weight_decay=0.0, momentum=0.0,
                               warmup_epochs=0.0, epochs=1)
        tx = backbone_optimizer(cfg, 100)
        _, state = tx.update(grads, tx.init(params), params)  # step 0: warm-up lr is 0
        updates, _ = tx.update(grads, state, params)
        moves[mult] = jax.tree_util.tree_map(lambda u: float(jax.numpy.abs(u).max()), updates)
    assert moves[8.0]["seg"]["bn"]["bias"] > 7.9 * moves[1.0]["seg"]["bn"]["bias"] > 0
    assert moves[8.0]["seg"]["conv"]["kernel"] == moves[1.0]["seg"]["conv"]["kernel"]
    assert moves[8.0]["head"]["Logits"]["bias"] == moves[1.0]["head"]["Logits"]["bias"]


def test_expert_optimizer_stops_each_kind_after_its_own_steps(tiny_cfg):
    """Each expert kind follows the schedule of its own budget: after its last step its
    lr is 0 and its parameters stay put (weight decay too), while the other kind, with
    more steps, keeps moving."""
    import jax.numpy as jnp
    import optax
    from cnneb_jax.optim import make_expert_optimizer

    tx = make_expert_optimizer(tiny_cfg, {"experts": 6, "aux5b": 3})
    params = {"experts": {"E1": {"kernel": jnp.ones((2, 2))}},
              "aux5b": {"E1": {"kernel": jnp.ones((2, 2))}}}
    opt = tx.init(params)
    history = []
    for i in range(6):
        grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    aux = [np.asarray(h["aux5b"]["E1"]["kernel"]) for h in history]
    e1 = [np.asarray(h["experts"]["E1"]["kernel"]) for h in history]
    assert not np.array_equal(aux[0], aux[1])          # moving inside its budget
    np.testing.assert_array_equal(aux[2], aux[5])      # still after its 3 steps
    assert not np.array_equal(e1[3], e1[4])            # the longer budget goes on
