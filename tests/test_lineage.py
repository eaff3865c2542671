"""What each stage was built from (cnneb_jax/lineage.py): stale experts and other data are
refused, a retrained backbone sets its old experts aside."""

import json

import jax.numpy as jnp
import pytest

from cnneb_jax import lineage
from cnneb_jax.workdir import begin_stage, check_data_lineage, load_trained
from cnneb_jax.expert_stage import train_expert

from conftest import copy_workdir


def test_the_digest_follows_every_value_and_nothing_else():
    tree = {"a": {"k": jnp.arange(6.0)}, "b": jnp.ones(2)}
    same = {"b": jnp.ones(2), "a": {"k": jnp.arange(6.0)}}
    assert lineage.variables_digest(tree) == lineage.variables_digest(same)
    other = {"a": {"k": jnp.arange(6.0).at[5].set(5.5)}, "b": jnp.ones(2)}
    assert lineage.variables_digest(tree) != lineage.variables_digest(other)


def test_both_stages_record_what_they_were_built_from(tiny_workdir, tiny_data):
    backbone = json.loads((tiny_workdir / "backbone" / "result.json").read_text())
    expert = json.loads((tiny_workdir / "expert" / "result.json").read_text())
    assert backbone["data"] == expert["data"] == tiny_data["identity"] is not None
    assert expert["backbone_sha256"] == backbone["variables_sha256"]
    load_trained(tiny_workdir)   # consistent: loads


def test_experts_of_another_backbone_are_refused(tiny_workdir, tmp_path):
    work = copy_workdir(tiny_workdir, tmp_path / "w")
    path = work / "expert" / "result.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "backbone_sha256": "0" * 64}))
    with pytest.raises(lineage.LineageError, match=r"trained on another backbone .*"
                                                   r"--stage expert --retrain"):
        load_trained(work)


def test_retraining_the_backbone_sets_its_old_experts_aside(tiny_workdir, tiny_cfg, tmp_path,
                                                            capsys):
    work = copy_workdir(tiny_workdir, tmp_path / "w")
    begin_stage(tiny_cfg, work, "backbone", retrain=True)
    assert not (work / "expert").exists() and not (work / "backbone").exists()
    (aside,) = work.glob("expert.stale-*")
    assert (aside / "result.json").exists()
    assert "moved to" in capsys.readouterr().out


def test_other_data_than_the_backbones_is_refused(tiny_workdir, tiny_cfg, tiny_data, tmp_path):
    work = copy_workdir(tiny_workdir, tmp_path / "w")
    other = {**tiny_data, "identity": "f" * 16}
    with pytest.raises(lineage.LineageError, match="trained on other data .* --data-dir"):
        check_data_lineage(work, other, "calibrating")
    with pytest.raises(lineage.LineageError, match="trained on other data"):
        train_expert(tiny_cfg, other, work, retrain=True)
    check_data_lineage(work, tiny_data, "calibrating")   # the same data: fine
