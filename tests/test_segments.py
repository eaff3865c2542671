import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnneb_jax.configs import BLOCKS, get_config
from cnneb_jax.segments import Conv, Segment, channels, segment_blocks


def _conv_kernels(tree) -> list[tuple[int, ...]]:
    """Conv kernel shapes in creation order (dicts keep insertion order; tree_leaves sorts)."""
    out = []
    for key, value in tree.items():
        if key == "conv":
            out.append(tuple(value["kernel"].shape))
        elif isinstance(value, dict):
            out.extend(_conv_kernels(value))
    return out


def test_segment_blocks_cover_the_network():
    assert segment_blocks(None, "Mixed_5b")[-1] == "Mixed_5b"
    assert segment_blocks("Mixed_5b", None)[0] == "Mixed_5c"
    assert list(segment_blocks(None, "Mixed_5b")) + list(segment_blocks("Mixed_5b", None)) \
        == list(BLOCKS)


def test_cifar_grid_sizes(tiny_cfg):
    x = jnp.zeros((2, 32, 32, 3))
    sizes = {}
    prev = None
    for name in ("Mixed_5b", "Mixed_6e", "Mixed_7c"):
        seg = Segment(tiny_cfg, prev, name)
        v = seg.init(jax.random.PRNGKey(0), x)
        x = seg.apply(v, x)
        sizes[name] = x.shape[1:3]
        prev = name
    assert sizes == {"Mixed_5b": (16, 16), "Mixed_6e": (8, 8), "Mixed_7c": (4, 4)}


def test_channels_scaling():
    assert channels(192, 1.0) == 192
    assert channels(192, 0.25) == 48
    assert channels(32, 0.0625) == 8  # never below 8


@pytest.mark.parametrize("kernel,strides", [((1, 1), 1), ((3, 3), 1), ((1, 7), 1), ((3, 3), 2)])
def test_conv_matches_lax_with_its_gradient(kernel, strides):
    """Conv runs 1x1 convs as a matmul: same outputs and gradients as lax.conv."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 5)), jnp.float32)
    conv = Conv(6, kernel, strides)
    v = conv.init(jax.random.PRNGKey(0), x)
    ref = lambda v, x: jax.lax.conv_general_dilated(
        x, v["params"]["kernel"], (strides, strides), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    loss = lambda f: (lambda v, x: jnp.sum(jnp.sin(f(v, x))))
    np.testing.assert_allclose(conv.apply(v, x), ref(v, x), rtol=1e-5, atol=1e-5)
    g = jax.grad(loss(conv.apply), argnums=(0, 1))(v, x)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_full_config_matches_keras_inception_v3():
    """Backbone + main head of the `full` config against keras.applications.InceptionV3:
    same conv kernel shapes in the same order, same Mixed-block output shapes, same
    parameter count (Keras counts BatchNorm moving statistics as parameters)."""
    keras = pytest.importorskip("keras")
    from cnneb_jax.heads import MainHead
    from cnneb_jax.model import count_params

    kmodel = keras.applications.InceptionV3(weights=None)
    convs = [l for l in kmodel.layers if type(l).__name__ == "Conv2D"]
    # model.layers is in graph order; the auto names conv2d, conv2d_1, ... give creation order.
    created = lambda l: int(l.name.rsplit("_", 1)[1]) if "_" in l.name else 0
    k_kernels = [tuple(l.kernel.shape) for l in sorted(convs, key=created)]
    k_mixed = [tuple(kmodel.get_layer(f"mixed{i}").output.shape[1:]) for i in range(11)]

    cfg = get_config("full")
    x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
    seg = Segment(cfg, None, None)
    variables = jax.eval_shape(lambda: seg.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))
    ours_kernels = _conv_kernels(variables["params"])
    assert ours_kernels == k_kernels

    ours_mixed, prev, h = [], None, x
    for name in [b for b in BLOCKS if b.startswith("Mixed")]:
        s = Segment(cfg, prev, name)
        h = jax.eval_shape(lambda h: s.apply(s.init(jax.random.PRNGKey(0), h), h),
                           jax.ShapeDtypeStruct(h.shape, jnp.float32))
        ours_mixed.append(tuple(h.shape[1:]))
        prev = name
    assert ours_mixed == k_mixed

    head = MainHead(cfg)
    hv = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), jnp.zeros(h.shape)))
    assert count_params(variables) + count_params(hv) == kmodel.count_params() == 23851784


def test_stage_widths_widen_only_their_blocks():
    """width_6 / width_7 set the channels of the 8x8- and 4x4-grid blocks; 0 keeps `width`."""
    x = jnp.zeros((1, 32, 32, 3))

    def shapes(**kw):
        cfg = get_config("tiny", {k: str(v) for k, v in kw.items()})
        out, h = {}, x
        for start, end in ((None, "Mixed_5d"), ("Mixed_5d", "Mixed_6e"), ("Mixed_6e", "Mixed_7c")):
            seg = Segment(cfg, start, end)
            h = seg.apply(seg.init(jax.random.PRNGKey(0), h), h)
            out[end] = h.shape
        return out

    base = shapes()
    assert shapes(width_6=0.0625, width_7=0.0625) == base    # explicit = the same as `width`
    wide = shapes(width_7=0.125)
    assert wide["Mixed_5d"] == base["Mixed_5d"] and wide["Mixed_6e"] == base["Mixed_6e"]
    assert wide["Mixed_7c"][-1] > base["Mixed_7c"][-1]
    wide6 = shapes(width_6=0.125)
    assert wide6["Mixed_5d"] == base["Mixed_5d"] and wide6["Mixed_6e"][-1] > base["Mixed_6e"][-1]
    with pytest.raises(ValueError, match="width_7"):
        get_config("tiny", {"width_7": "-1"})


def test_skipped_blocks_have_no_parameters_and_branch_points_cannot_be_skipped():
    """`skip_blocks`: the skipped blocks hold no parameters, the others are all there, and
    a branch point or a grid-changing block cannot be skipped."""
    skip = ("Mixed_5c", "Mixed_5d", "Mixed_6c", "Mixed_6d")
    cfg = get_config("tiny", {"skip_blocks": ",".join(skip)})
    assert cfg.skip_blocks == skip == get_config("tiny").skip_blocks

    def blocks(c):
        return set(jax.eval_shape(Segment(c, None, None).init, jax.random.PRNGKey(0),
                                  jnp.zeros((1, 32, 32, 3)))["params"])
    names = blocks(cfg)
    assert not names & set(skip)
    assert {"Mixed_5b", "Mixed_6a", "Mixed_6b", "Mixed_6e", "Mixed_7a", "Mixed_7c"} <= names
    assert blocks(cfg.replace(skip_blocks=())) - names == set(skip)
    with pytest.raises(ValueError, match="cannot be left out"):
        get_config("tiny", {"skip_blocks": "Mixed_6a"})
    with pytest.raises(ValueError, match="cannot be left out"):
        get_config("tiny", {"skip_blocks": "Mixed_5b"})
