import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnneb_jax import onednn, pooling
from cnneb_jax.model import build_model, init_variables
from cnneb_jax.segments import ConvBN

needs_onednn = pytest.mark.skipif(not onednn.available(),
                                  reason="oneDNN kernels not built (python -m cnneb_jax.onednn)")
_DN = ("NHWC", "HWIO", "NHWC")
# (batch, height, width, in, kernel h, kernel w, out, stride, padding): the kinds of conv
# Inception v3 has, odd channel counts included (bfloat16 kernels get padded when packed).
SHAPES = [(2, 9, 9, 5, 3, 3, 7, 1, "SAME"), (2, 10, 11, 5, 3, 3, 7, 2, "VALID"),
          (1, 12, 12, 16, 1, 7, 24, 1, "SAME"), (3, 8, 8, 37, 7, 1, 51, 1, "SAME"),
          (2, 9, 9, 64, 3, 3, 96, 2, "SAME"), (2, 5, 5, 40, 1, 1, 24, 1, "SAME")]


def _operands(shape, seed=0):
    n, h, w, c, kh, kw, o, s, pad = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(kh, kw, c, o)) / np.sqrt(kh * kw * c), jnp.float32)
    return x, k, (s, s), pad


def _lax(x, k, strides, pad):
    return jax.lax.conv_general_dilated(x, k, strides, pad, dimension_numbers=_DN)


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_and_its_gradients_match_xla_in_float32(shape):
    x, k, strides, pad = _operands(shape)
    ref = _lax(x, k, strides, pad)
    got = jax.jit(onednn.conv, static_argnums=(2, 3))(x, k, strides, pad)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    dy = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape), jnp.float32)
    ours = jax.grad(lambda a, b: jnp.sum(onednn.conv(a, b, strides, pad) * dy), (0, 1))(x, k)
    theirs = jax.grad(lambda a, b: jnp.sum(_lax(a, b, strides, pad) * dy), (0, 1))(x, k)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_conv_with_batchnorm_and_relu_matches_xla(shape):
    x, k, strides, pad = _operands(shape)
    o = k.shape[-1]
    rng = np.random.default_rng(2)
    scale = jnp.asarray(rng.uniform(0.5, 2, o), jnp.float32)
    offset = jnp.asarray(rng.normal(size=o), jnp.float32)
    xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    ref = jax.nn.relu(_lax(xb.astype(jnp.float32), kb.astype(jnp.float32), strides, pad)
                      * scale + offset)
    f = jax.jit(lambda a, b: onednn.conv_affine_relu(a, b, scale, offset, strides=strides,
                                                     padding=pad, relu=True, cache_kernel=True))
    got = f(xb, kb)
    assert got.dtype == jnp.bfloat16 and got.shape == ref.shape
    # bfloat16 output: 8 bits of mantissa
    np.testing.assert_allclose(got.astype(jnp.float32), ref, rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(ref).max()))
    # the second call finds the packed kernel by its content; a changed kernel is not mixed
    # up with it
    np.testing.assert_array_equal(f(xb, kb), got)
    kb2 = (k * 2).astype(jnp.bfloat16)
    ref2 = jax.nn.relu(_lax(xb.astype(jnp.float32), kb2.astype(jnp.float32), strides, pad)
                       * scale + offset)
    np.testing.assert_allclose(f(xb, kb2).astype(jnp.float32), ref2, rtol=2e-2,
                               atol=2e-2 * float(jnp.abs(ref2).max()))


@needs_onednn
@pytest.mark.parametrize("kind", ["max", "avg", "avg_exclude_pad"])
@pytest.mark.parametrize("k,s,pad", [(3, 2, "VALID"), (3, 2, "SAME"), (3, 1, "SAME"),
                                     (5, 3, "VALID")])
def test_pools_and_their_gradients_match_the_slices(kind, k, s, pad):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8, 6)), jnp.float32)
    kw = {} if kind == "max" else {"count_include_pad": kind == "avg"}
    fn = pooling.max_pool if kind == "max" else pooling.avg_pool
    ours = lambda t: fn(t, k, s, pad, onednn_mode="on", **kw)
    ref = lambda t: fn(t, k, s, pad, **kw)
    np.testing.assert_allclose(jax.jit(ours)(x), ref(x), rtol=1e-6, atol=1e-6)
    g1 = jax.grad(lambda t: jnp.sum(ours(t) ** 2))(x)
    g2 = jax.grad(lambda t: jnp.sum(ref(t) ** 2))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("average", [False, True])
def test_pool_gradients_run_onednns_backward_in_bfloat16_too(average):
    # distinct values (bfloat16 holds these integers exactly): no ties, which the two
    # gradients would split differently
    x = np.random.default_rng(1).permutation(196).reshape(1, 7, 7, 4) - 98.0
    x = jnp.asarray(x / 8, jnp.bfloat16)
    fn = ((lambda t, m: pooling.avg_pool(t, 3, 1, "SAME", False, m)) if average
          else (lambda t, m: pooling.max_pool(t, 3, 2, "VALID", m)))
    loss = lambda m: (lambda t: jnp.sum(fn(t, m).astype(jnp.float32) ** 2))
    grad = jax.jit(jax.grad(loss("on")))
    assert "cnneb_onednn_pool_bwd" in grad.lower(x).as_text()
    g1, g2 = grad(x).astype(jnp.float32), jax.grad(loss("off"))(x).astype(jnp.float32)
    np.testing.assert_allclose(g1, g2, rtol=2e-2, atol=2e-2 * float(jnp.abs(g2).max()))


@needs_onednn
@pytest.mark.parametrize("kernel,strides", [((3, 3), 1), ((1, 7), 1), ((3, 3), 2), ((1, 1), 1)])
def test_convbn_gives_xlas_numbers_in_train_and_eval_mode(kernel, strides):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 9, 9, 8)), jnp.float32)
    mods = {m: ConvBN(16, kernel, strides, "SAME", onednn_mode=m) for m in ("on", "off")}
    v = mods["off"].init(jax.random.PRNGKey(0), x, train=False)
    assert jax.tree.structure(mods["on"].init(jax.random.PRNGKey(0), x, train=False)) \
        == jax.tree.structure(v)  # same variables: checkpoints load either way
    # BatchNorm statistics that matter, so a wrong fold would show
    rng = np.random.default_rng(3)
    v = {"params": {**v["params"], "bn": {"bias": jnp.asarray(rng.normal(size=16),
                                                              jnp.float32)}},
         "batch_stats": {"bn": {"mean": jnp.asarray(rng.normal(size=16), jnp.float32),
                                "var": jnp.asarray(rng.uniform(0.2, 3, 16), jnp.float32)}}}
    outs = {m: mod.apply(v, x, train=False) for m, mod in mods.items()}
    np.testing.assert_allclose(outs["on"], outs["off"], rtol=1e-5, atol=1e-5)
    jaxprs = {m: str(jax.make_jaxpr(lambda t, mod=mod: mod.apply(v, t, train=False))(x))
              for m, mod in mods.items()}
    assert "cnneb_onednn_conv_fwd" in jaxprs["on"] and "cnneb_onednn" not in jaxprs["off"]
    # "inference": oneDNN's fused kernel in eval mode, XLA's in a training step
    mod = ConvBN(16, kernel, strides, "SAME", onednn_mode="inference")
    assert "cnneb_onednn_conv_fwd" in str(jax.make_jaxpr(
        lambda t: mod.apply(v, t, train=False))(x))
    assert "cnneb_onednn" not in str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(mod.apply(
        {**v, "params": p}, x, train=True, mutable=["batch_stats"])[0])))(v["params"]))
    # training: oneDNN's BatchNorm-ReLU, the same outputs, running statistics and gradients
    # (up to float rounding: oneDNN sums the variance in another order)
    train = {m: mods[m].apply(v, x, train=True, mutable=["batch_stats"]) for m in mods}
    np.testing.assert_allclose(train["on"][0], train["off"][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(train["on"][1]), jax.tree.leaves(train["off"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert "cnneb_onednn_bn_relu_train" in str(jax.make_jaxpr(
        lambda t: mods["on"].apply(v, t, train=True, mutable=["batch_stats"]))(x))
    loss = lambda m: lambda p: jnp.sum(mods[m].apply({**v, "params": p}, x, train=True,
                                                     mutable=["batch_stats"])[0] ** 2)
    # every conv's gradients are oneDNN's, 1x1 ones included (as matmuls beside oneDNN's
    # calls they slowed the train step)
    assert "cnneb_onednn_conv_bwd_weights" in str(jax.make_jaxpr(jax.grad(loss("on")))(
        v["params"]))
    g_on, g_off = (jax.grad(loss(m))(v["params"]) for m in ("on", "off"))
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


@needs_onednn
def test_tiny_model_logits_agree_with_xla(tiny_cfg):
    """The whole tiny network, eval mode, every exit: oneDNN's and XLA's kernels agree."""
    outs = {}
    for mode in ("on", "off"):
        cfg = dataclasses.replace(tiny_cfg, onednn=mode)
        model = build_model(cfg)
        v = init_variables(model, jax.random.PRNGKey(0))
        x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, cfg.image_size,
                                                                 cfg.image_size, 3)),
                        jnp.float32)
        h, logits = x, []
        for (name, seg), head in zip(model.segments.items(), model.heads.values()):
            h = seg.apply(v["segments"][name], h, train=False)
            logits.append(head.apply(v["heads"][list(model.heads)[len(logits)]], h,
                                     train=False))
        outs[mode] = logits
    for a, b in zip(outs["on"], outs["off"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_use_follows_the_mode(monkeypatch):
    assert not onednn.use("off", jnp.float32)
    assert not onednn.use("auto", jnp.float64)
    assert not onednn.use("inference", jnp.float32, training=True)
    assert onednn.use("inference", jnp.float32) == onednn.use("auto", jnp.float32)
    with pytest.raises(ValueError, match="one of"):
        onednn.use("fast", jnp.float32)
    monkeypatch.setattr(onednn, "_load", lambda: "not built (test)")
    with pytest.warns(UserWarning, match="not built .test.; running XLA"):
        assert not onednn.use("auto", jnp.float32)
    with pytest.raises(onednn.OneDNNUnavailable, match="not built"):
        onednn.use("on", jnp.float32)


def test_library_name_changes_with_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNEB_ONEDNN_DIR", str(tmp_path))
    first = onednn.library_path()
    assert first.parent == tmp_path
    src = tmp_path / "changed.cc"
    src.write_text(onednn._SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(onednn, "_SOURCE", src)
    assert onednn.library_path() != first
