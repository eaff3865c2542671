import jax
import jax.numpy as jnp
import numpy as np

from cnneb_jax.configs import get_config
from cnneb_jax.model import (backbone_forward, build_model, count_params, init_variables,
                             segment_fns, split_collections)


def test_segments_and_exits_of_default_layout(tiny_cfg):
    model = build_model(tiny_cfg)
    assert model.segment_names == ["stem->Mixed_5b", "Mixed_5b->end"]
    assert list(model.heads) == ["O1", "O2"] and list(model.experts) == ["E1"]


def test_chained_segments_equal_joint_forward(tiny_cfg):
    """Each segment is jitted on its own; chained they give the joint network's outputs."""
    model = build_model(tiny_cfg)
    v = init_variables(model, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    fns = segment_fns(model)
    h = fns["seg:stem->Mixed_5b"](v["segments"]["stem->Mixed_5b"], x)
    o1 = fns["head:O1"](v["heads"]["O1"], h)
    e1 = fns["expert:E1"](v["experts"]["E1"], h, o1)
    a5 = fns["aux5b:E1"](v["aux5b"]["E1"], h)
    o2 = fns["head:O2"](v["heads"]["O2"], fns["seg:Mixed_5b->end"](v["segments"]["Mixed_5b->end"], h))
    p, s = split_collections(v)
    logits, feats, _ = jax.jit(lambda p, s, x: backbone_forward(model, p, s, x, False))(p, s, x)
    np.testing.assert_allclose(o1, logits[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o2, logits[1], rtol=1e-5, atol=1e-5)
    assert e1.shape == (4, 2) and a5.shape == (4, 2)


def test_two_exit_config_builds_and_runs():
    cfg = get_config("tiny", {"branch_points": "Mixed_5b,Mixed_6e"})
    model = build_model(cfg)
    assert model.segment_names == ["stem->Mixed_5b", "Mixed_5b->Mixed_6e", "Mixed_6e->end"]
    v = init_variables(model, jax.random.PRNGKey(0))
    p, s = split_collections(v)
    logits, feats, _ = backbone_forward(model, p, s, jnp.zeros((2, 32, 32, 3)), False)
    assert [l.shape for l in logits] == [(2, 10)] * 3
    assert feats[1].shape[1:3] == (8, 8)
    assert set(v["experts"]) == {"E1", "E2"}


def test_batchnorm_train_vs_eval(tiny_cfg):
    model = build_model(tiny_cfg)
    p, s = split_collections(init_variables(model, jax.random.PRNGKey(0)))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)) * 3 + 1
    _, _, s_eval = backbone_forward(model, p, s, x, train=False)
    _, _, s_train = backbone_forward(model, p, s, x, train=True)
    same = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), s["segments"],
                                  s_eval["segments"])
    assert all(jax.tree_util.tree_leaves(same))          # eval leaves statistics alone
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), s["segments"],
                                     s_train["segments"])
    assert not all(jax.tree_util.tree_leaves(changed))   # train updates them


def test_cifar_prefix_is_cheap():
    """Issue budget: stem -> Mixed_5b + O1 + E1 costs at most 35% of the whole network."""
    from cnneb_jax.metrics import prefix_share, segment_flops
    from cnneb_jax.model import abstract_variables
    cfg = get_config("cifar", {"num_classes": "10"})
    model = build_model(cfg)
    # Shapes are all XLA's cost analysis needs: skip the eager initialisation (~20 s).
    v = abstract_variables(model)
    flops = segment_flops(model, v)
    assert flops["seg:Mixed_5b->end"] > 5 * flops["seg:stem->Mixed_5b"] > 0
    assert 0 < prefix_share(flops) <= 0.35
    assert count_params(v["segments"]) > 1_000_000


def test_bfloat16_compute_keeps_float32_params_and_matches_float32(tiny_cfg):
    """Mixed precision: the same parameters give nearly the same loss in bf16; gradients,
    updated parameters and logits stay float32."""
    from cnneb_jax.optim import backbone_optimizer
    from cnneb_jax.backbone_stage import make_backbone_step

    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), np.uint8)
    labels = np.arange(8) % 10
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_cfg.replace(compute_dtype=dtype)
        model = build_model(cfg)
        variables = init_variables(model, jax.random.PRNGKey(0))
        params, stats = split_collections({g: variables[g] for g in ("segments", "heads")})
        tx = backbone_optimizer(cfg, 6)  # as the tiny run's: its float32 step is cached
        state = {"params": params, "stats": stats, "opt": tx.init(params)}
        state, metrics = make_backbone_step(model, cfg, tx)(state, images, labels,
                                                           jax.random.PRNGKey(1))
        losses[dtype] = float(metrics["loss"])
        floats = [a for a in jax.tree_util.tree_leaves(state)
                  if jnp.issubdtype(a.dtype, jnp.floating)]  # not the optimizer's step count
        assert floats and all(a.dtype == jnp.float32 for a in floats)
        fns = segment_fns(model)
        h = fns["seg:stem->Mixed_5b"](variables["segments"]["stem->Mixed_5b"],
                                     images.astype(np.float32))
        assert h.dtype == jnp.dtype(dtype)
        assert fns["head:O1"](variables["heads"]["O1"], h).dtype == jnp.float32
    assert np.isfinite(losses["bfloat16"])
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.05 * losses["float32"]


def test_bfloat16_deep_keeps_segment_0_in_float32_and_the_rest_in_bfloat16(tiny_cfg):
    """`bfloat16_deep`: at load, segment 0's parameters stay float32 and every other
    part's become bfloat16; segment 0 computes in float32, the deep segment and the exits
    in bfloat16; the cascade's programs answer close to float32's."""
    import pytest
    from cnneb_jax.model import branch_fn, inference_variables, to_compute_dtype
    cfg = tiny_cfg.replace(compute_dtype="bfloat16_deep")
    model = build_model(cfg)
    variables = init_variables(model, jax.random.PRNGKey(0))
    cast = inference_variables(cfg, variables)
    dtypes = lambda tree: {a.dtype for a in jax.tree_util.tree_leaves(tree["params"])}
    assert dtypes(cast["segments"]["stem->Mixed_5b"]) == {jnp.dtype(jnp.float32)}
    for group, name in (("segments", "Mixed_5b->end"), ("heads", "O1"), ("heads", "O2"),
                        ("experts", "E1"), ("aux5b", "E1")):
        assert dtypes(cast[group][name]) == {jnp.dtype(jnp.bfloat16)}, (group, name)
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), np.uint8)
    fns = segment_fns(model)
    h = fns["seg:stem->Mixed_5b"](cast["segments"]["stem->Mixed_5b"], images.astype(np.float32))
    assert h.dtype == jnp.float32
    assert fns["seg:Mixed_5b->end"](cast["segments"]["Mixed_5b->end"], h).dtype == jnp.bfloat16
    ref_model = build_model(tiny_cfg)
    ref = inference_variables(tiny_cfg, variables)
    got = jax.jit(branch_fn(model, 0, "plain"))(cast, images)[1]     # O1's logits
    want = jax.jit(branch_fn(ref_model, 0, "plain"))(ref, images)[1]
    assert got.dtype == jnp.float32 and not np.array_equal(got, want)   # bf16 in O1's head
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05 * np.abs(want).max())
    with pytest.raises(ValueError, match="differs by part"):
        to_compute_dtype(cfg, variables)


def test_whitening_kernel_decorrelates_patches():
    """Both signs of the top eigen-directions: the first half of the channels gives
    uncorrelated, unit-variance responses on the images it was computed from."""
    from cnneb_jax.augment import normalize
    from cnneb_jax.model import whitening_kernel
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (40, 16, 16, 3)).astype(np.float64)
    images = ((noise + np.roll(noise, 1, 1) + np.roll(noise, 1, 2)) / 3).astype(np.uint8)
    w = whitening_kernel(images, 20)
    assert w.shape == (3, 3, 3, 20)
    np.testing.assert_allclose(w[..., 10:], -w[..., :10])
    x = np.asarray(normalize(images), np.float64)
    patches = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))
    patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 27)
    cov = np.cov((patches @ w.reshape(27, 20)[:, :10]).T)
    np.testing.assert_allclose(cov, np.eye(10), atol=2e-3)


def test_identity_kernels_make_each_conv_pass_its_first_channels_through(tiny_cfg):
    """Every backbone conv's first min(in, out) outputs copy its inputs at the kernel's
    centre; its other outputs, the heads and the BatchNorm offsets keep their init."""
    from cnneb_jax.model import identity_kernels
    from cnneb_jax.segments import _conv
    model = build_model(tiny_cfg)
    params, _ = split_collections(init_variables(model, jax.random.PRNGKey(0)))
    out = identity_kernels(params)
    stem = out["segments"]["stem->Mixed_5b"]
    w = stem["Conv2d_2b_3x3"]["conv"]["kernel"]          # 3x3, in <= out
    cin = w.shape[2]
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, cin))
    np.testing.assert_allclose(_conv(x, w, 1, "SAME")[..., :cin], x, atol=1e-6)
    before = params["segments"]["stem->Mixed_5b"]["Conv2d_2b_3x3"]["conv"]["kernel"]
    np.testing.assert_array_equal(w[..., cin:], before[..., cin:])
    seven = out["segments"]["Mixed_5b->end"]["Mixed_6b"]["Branch_1_Conv2d_0b_1x7"]["conv"]["kernel"]
    k = min(seven.shape[2:])
    assert seven.shape[:2] == (1, 7)
    np.testing.assert_array_equal(seven[0, 3, :k, :k], np.eye(k))
    np.testing.assert_array_equal(seven[0, 2, :k, :k], np.zeros((k, k)))
    same = lambda a, b: jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))
    assert same(out["heads"], params["heads"])
    assert same(stem["Mixed_5b"]["Branch_0_Conv2d_0a_1x1"]["bn"],
                params["segments"]["stem->Mixed_5b"]["Mixed_5b"]["Branch_0_Conv2d_0a_1x1"]["bn"])
