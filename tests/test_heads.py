import jax
import jax.numpy as jnp

from cnneb_jax.heads import OTHER, Aux5bExpert, AuxHead, ExpertHead, MainHead
from cnneb_jax.model import count_params


def _init(module, *args):
    v = module.init(jax.random.PRNGKey(0), *args)
    return v, module.apply(v, *args)


def test_head_shapes_and_sizes(tiny_cfg):
    feat = jnp.ones((3, 16, 16, 16))  # a Mixed_5b-like map on the CIFAR grid
    v1, o1 = _init(AuxHead(tiny_cfg), feat)
    assert o1.shape == (3, 10)
    ve, e1 = _init(ExpertHead(tiny_cfg), feat, o1)
    assert e1.shape == (3, 2)
    va, a5 = _init(Aux5bExpert(tiny_cfg), feat)
    assert a5.shape == (3, 2)
    v2, o2 = _init(MainHead(tiny_cfg), jnp.ones((3, 4, 4, 64)))
    assert o2.shape == (3, 10)
    assert count_params(v2["params"]) == 64 * 10 + 10
    # E1 is O1-shaped up to the concat: the same conv layers, then the decision layers.
    conv_shapes = lambda v: [x.shape for x in jax.tree_util.tree_leaves(v["params"]["AuxLayers"])]
    assert conv_shapes(v1) == conv_shapes(ve)
    # The Aux+5b expert puts an Inception-A block in front of the O1-like layers.
    assert list(va["params"]) == ["Mixed_5b", "AuxLayers", "Hidden", "Decision"]


def test_expert_sees_o1_output(tiny_cfg):
    """The concat is real: E1's decision depends on O1's logits."""
    feat = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 16))
    head = ExpertHead(tiny_cfg)
    o1 = jnp.zeros((2, 10))
    v = head.init(jax.random.PRNGKey(0), feat, o1)
    a = head.apply(v, feat, o1)
    b = head.apply(v, feat, o1.at[:, 3].set(5.0))
    assert not jnp.allclose(a, b)
    assert OTHER == 1


def test_expert_inputs_paper_eq5_and_ablation(tiny_cfg):
    """"paper" concatenates O1's softmax output (10 values), "logits" its pre-softmax output
    as Eq. (5) writes it (10 values, the raw logits), the ablation O1's softmax, logits and 3
    confidence summaries (10 + 10 + 3 values), all to the same O1-like features."""
    feat = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 16))
    o1 = jax.random.normal(jax.random.PRNGKey(2), (2, 10))
    widths = {}
    for inputs in ("paper", "logits", "paper+confidence"):
        head = ExpertHead(tiny_cfg.replace(expert_inputs=inputs))
        v = head.init(jax.random.PRNGKey(0), feat, o1)
        widths[inputs] = v["params"]["Hidden"]["kernel"].shape[0]
        # Logits that give the same softmax give the same decision in the paper's E1 only.
        a, b = head.apply(v, feat, o1), head.apply(v, feat, o1 + 3.0)
        assert jnp.allclose(a, b, atol=1e-5) == (inputs == "paper")
        if inputs == "logits":
            # O1's output enters only through the last 10 rows of the first dense layer:
            # with them zeroed, the decision no longer depends on it.
            cut = jax.tree_util.tree_map(lambda x: x, v)
            cut["params"]["Hidden"]["kernel"] = v["params"]["Hidden"]["kernel"].at[-10:].set(0)
            assert jnp.allclose(head.apply(cut, feat, o1), head.apply(cut, feat, 5 * o1))
    assert widths["paper+confidence"] - widths["paper"] == 13
    assert widths["logits"] == widths["paper"]
