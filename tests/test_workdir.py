"""Reading a trained workdir: the evaluation variables alone, whatever the optimizer."""

import jax
import optax

from cnneb_jax import checkpoints as ckpt
from cnneb_jax import optim
from cnneb_jax.model import BACKBONE_GROUPS, abstract_variables, merge_collections, \
    split_collections
from cnneb_jax.workdir import load_trained, subset

from conftest import leaves_equal


def test_reading_a_workdir_builds_no_optimizer(tiny_workdir, tiny_cfg, monkeypatch):
    """load_trained restores parameters and statistics without the optimizer state: it
    loads with every optimizer constructor broken (an optimizer changed since training
    cannot make a workdir unreadable), and gives what the full checkpoint holds."""
    model, _ = load_trained(tiny_workdir)
    params, stats = split_collections(subset(abstract_variables(model, tiny_cfg.seed),
                                             BACKBONE_GROUPS))
    like = {"params": params, "stats": stats,
            "opt": jax.eval_shape(optim.backbone_optimizer(tiny_cfg, 10).init, params)}
    mngr = ckpt.manager(tiny_workdir / "backbone")
    full = ckpt.restore_latest(mngr, like)[1]
    mngr.close()

    def broken(*args, **kwargs):
        raise AssertionError("reading a workdir built an optimizer")
    for name in ("sgd", "adam", "multi_transform", "chain"):
        monkeypatch.setattr(optax, name, broken)
    monkeypatch.setattr(optim, "make_optimizer", broken)
    _, variables = load_trained(tiny_workdir)
    assert leaves_equal(subset(variables, BACKBONE_GROUPS),
                        merge_collections(full["params"], full["stats"]))
    assert set(variables) == {"segments", "heads", "experts", "aux5b"}
