import json
from pathlib import Path

import jax
import numpy as np
import pytest

from cnneb_jax import release
from cnneb_jax.release import ReleaseError, load_release
from cnneb_jax.workdir import load_trained, save_release
from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "pretrained" / "cifar"


@pytest.fixture(scope="module")
def tiny_release(tiny_workdir, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "tiny"
    meta = save_release(tiny_workdir, out, "python train.py --config tiny",
                        image_folder / "test", per_class=2)
    return out, meta


def test_release_holds_the_eval_variables_of_both_stages(tiny_workdir, tiny_release):
    out, meta = tiny_release
    assert sorted(p.name for p in out.iterdir()) == [
        "backbone", "class_names.json", "config.json", "expert", "release.json",
        "variables.msgpack"]
    assert meta["command"] == "python train.py --config tiny"
    assert meta["reference"]["images"] == 20
    _, want = load_trained(tiny_workdir)
    _, got = load_trained(out)  # the release is taken wherever a workdir is
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_release_reference_accuracy_is_reproducible(tiny_release, image_folder):
    out, meta = tiny_release
    model, variables = load_release(out)
    files, labels = release.reference_files(image_folder / "test", 2)
    acc = release.exit_accuracy_on(model, variables, release.read_images(files), labels)
    assert acc == meta["reference"]["accuracy"]


def test_damaged_release_is_refused(tiny_release, tmp_path):
    out, _ = tiny_release
    import shutil
    bad = shutil.copytree(out, tmp_path / "bad")
    (bad / "variables.msgpack").write_bytes(b"not msgpack")
    with pytest.raises(ReleaseError, match="cannot be read"):
        load_release(bad)
    wrong = shutil.copytree(out, tmp_path / "wrong")
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["width"] = cfg["width"] * 2
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReleaseError, match="has shape"):
        load_release(wrong)


@pytest.mark.skipif(not (SHIPPED / "release.json").exists() or not (SHARED / "test").is_dir(),
                    reason="needs pretrained/cifar and ../shared/datasets/cifar10-jpeg")
def test_shipped_cifar_model_keeps_its_accuracy():
    """The shipped reference model, re-evaluated on its fixed test subset (the first 50
    test images of every class), gives the accuracies recorded when it was released."""
    meta = json.loads((SHIPPED / "release.json").read_text())
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size <= 10 * 2**20
    model, variables = load_release(SHIPPED)
    files, labels = release.reference_files(SHARED / "test", meta["reference"]["per_class"])
    acc = release.exit_accuracy_on(model, variables, release.read_images(files), labels)
    n = meta["reference"]["images"]
    for k, want in meta["reference"]["accuracy"].items():
        # CPUs may round differently: at most one image of the subset may change its answer.
        assert abs(acc[k] - want) <= 1.0 / n + 1e-9, (k, acc[k], want)


def test_calibrating_a_release_never_writes_into_it(tiny_release, tiny_data, tmp_path,
                                                     monkeypatch):
    """A release (the shipped `pretrained/cifar` sits in the repository) stays as shipped:
    its operating point goes to the user's cache, and later loads find it there."""
    import shutil
    from cnneb_jax import api
    release = shutil.copytree(tiny_release[0], tmp_path / "release")
    monkeypatch.setenv("CNNEB_CACHE", str(tmp_path / "cache"))
    before = sorted(p.relative_to(release) for p in release.rglob("*"))
    cascade = api.load(release, max_batch=8, warm=False)
    point = api.calibrate(cascade, tiny_data["calib_images"], tiny_data["calib_labels"],
                          rule="max_softmax", max_drop=0.5)
    assert sorted(p.relative_to(release) for p in release.rglob("*")) == before
    (stored,) = (tmp_path / "cache" / "operating_points").glob("*.json")
    assert api.operating_point_path(release) == stored
    again = api.load(release, max_batch=8, warm=False)
    assert again.operating_point["threshold"] == point["threshold"]
