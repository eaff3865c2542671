"""Export round trip: the exported cascade (jax.export StableHLO + manifest) run by
`cnneb_jax.serving` gives the live cascade's answers, without importing the model code."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnneb_jax import api, serving
from cnneb_jax.export import export_cascade

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_workdir, tiny_data, tmp_path_factory):
    cascade = api.load(tiny_workdir, max_batch=8)
    point = api.calibrate(cascade, tiny_data["calib_images"], tiny_data["calib_labels"],
                          "max_softmax", max_drop=0.0, save=False)  # shared workdir: no write
    out = export_cascade(cascade, tmp_path_factory.mktemp("export") / "export", "max_softmax",
                         point["threshold"], point)
    return cascade, out, point


@pytest.fixture(scope="module")
def served(exported):
    """The exported cascade, loaded once for every test that runs it."""
    return serving.load(exported[1])


def test_manifest_records_the_operating_point(exported):
    _, out, point = exported
    m = json.loads((out / "manifest.json").read_text())
    assert m["branch_points"] == ["Mixed_5b"] and m["input_shape"] == [32, 32, 3]
    assert m["bucket_sizes"] == [1, 2, 4, 8] and m["rule"] == "max_softmax"
    assert m["threshold"] == pytest.approx(point["threshold"])
    assert {p["name"] for p in m["parts"]} == {"seg0", "head0", "expert0", "aux5b0",
                                                "seg1", "head1"}


@pytest.mark.parametrize("rule", ["expert", "aux5b", "max_softmax", "entropy"])
def test_exported_cascade_equals_the_live_one(exported, served, tiny_data, rule):
    live = exported[0]
    x = tiny_data["test_images"]  # 16 images: two full buckets of 8
    for t in (0.0, 0.3, 0.6, 1.0):
        a = api.predict(live, x, rule, t)
        b = serving.predict(served, x, rule, t)
        np.testing.assert_array_equal(a["exit"], b["exit"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(a["probs"], b["probs"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a["flops"], b["flops"])
    assert set(b["exit"]) <= {0, 1}


def test_serving_runs_without_the_model_code(exported, tiny_data, tmp_path):
    _, out, _ = exported
    np.save(tmp_path / "x.npy", tiny_data["test_images"][:5])
    code = (f"import sys, numpy as np; from cnneb_jax import serving; "
            f"c = serving.load({str(out)!r}); "
            f"r = serving.predict(c, np.load({str(tmp_path / 'x.npy')!r})); "
            f"bad = [m for m in ('flax', 'optax', 'cnneb_jax.model', 'cnneb_jax.loop', "
            f"'cnneb_jax.segments') if m in sys.modules]; "
            f"assert not bad, bad; print(r['labels'].shape, r['exit'].shape)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(5,) (5,)" in r.stdout


def test_api_and_serving_read_float_and_uint8_alike(exported, served, tiny_data):
    """One input convention: the same uint8 batch, and the same batch as floats in [0, 1],
    get the same answers from the live API and from the exported server."""
    live = exported[0]
    u8 = tiny_data["test_images"][:6]
    f = u8.astype(np.float32) / 255.0
    ref = api.predict(live, u8, "max_softmax", 0.5)
    for out in (api.predict(live, f, "max_softmax", 0.5),
                serving.predict(served, u8, "max_softmax", 0.5),
                serving.predict(served, f, "max_softmax", 0.5)):
        np.testing.assert_array_equal(out["labels"], ref["labels"])
        np.testing.assert_array_equal(out["exit"], ref["exit"])
        np.testing.assert_allclose(out["probs"], ref["probs"], rtol=1e-4, atol=1e-5)
    # Floats on the [0, 255] scale are refused by both, not silently misread.
    for fn in (lambda x: api.predict(live, x, "max_softmax", 0.5),
               lambda x: serving.predict(served, x)):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(u8.astype(np.float32))


def test_serving_refuses_bad_input(exported, served):
    with pytest.raises(ValueError, match="images must be"):
        serving.predict(served, np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="threshold"):
        serving.predict(served, np.zeros((2, 32, 32, 3), np.uint8), threshold=2.0)
    with pytest.raises(ValueError, match="threshold must be a number"):
        serving.predict(served, np.zeros((2, 32, 32, 3), np.uint8), threshold="0.5")
    with pytest.raises(ValueError, match="no manifest.json"):
        serving.load(exported[1].parent)


def test_export_runs_on_cpu_and_cuda(exported):
    """Every part is lowered for both platforms, whatever machine exported it."""
    import jax
    _, out, _ = exported
    m = json.loads((out / "manifest.json").read_text())
    assert m["platforms"] == ["cpu", "cuda"]
    for part in m["parts"]:
        exp = jax.export.deserialize(bytearray((out / part["file"]).read_bytes()))
        assert exp.platforms == ("cpu", "cuda")


def _edit_manifest(d, **changes):
    m = json.loads((d / "manifest.json").read_text())
    for k, v in changes.items():
        if v is None:
            del m[k]
        else:
            m[k] = v
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "seg1.stablehlo").unlink(), r"part seg1 \(seg1.stablehlo\) is missing"),
    (lambda d: (d / "head0.stablehlo").write_bytes((d / "head0.stablehlo").read_bytes()[:100]),
     "part head0 .* is damaged or was changed"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda d: _edit_manifest(d, input_shape=[28, 28, 3]), "input_shape .* disagrees"),
    (lambda d: _edit_manifest(d, num_classes=100), "num_classes 100 disagrees"),
    (lambda d: _edit_manifest(d, threshold=2), r"threshold must be a number in \[0, 1\]"),
    (lambda d: _edit_manifest(d, rule=None), "field 'rule' is missing"),
    (lambda d: _edit_manifest(d, platforms=["tpu"]), "exported for tpu; this machine runs cpu"),
    (lambda d: _edit_manifest(d, parts=[p for p in json.loads(
        (d / "manifest.json").read_text())["parts"] if p["name"] != "expert0"]),
     r"parts \['expert0'\] are missing"),
])
def test_damaged_or_edited_export_is_a_clear_error(exported, tmp_path, damage, message):
    import shutil
    d = Path(shutil.copytree(exported[1], tmp_path / "export"))
    damage(d)
    with pytest.raises(serving.ExportError, match=message):
        serving.load(d)
