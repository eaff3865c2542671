"""The programmatic API on a tiny trained workdir."""

import json
from pathlib import Path

import numpy as np
import pytest

from cnneb_jax import api, throughput
from cnneb_jax.controller import all_outputs, run_cascade, run_plain

from conftest import copy_workdir


@pytest.fixture(scope="module")
def api_workdir(tiny_workdir, tmp_path_factory):
    # A copy: calibrate stores its point in the workdir.
    return copy_workdir(tiny_workdir, tmp_path_factory.mktemp("api") / "w")


@pytest.fixture(scope="module")
def cascade(api_workdir):
    return api.load(api_workdir, max_batch=8)


def test_predict_uint8_and_float_agree(cascade, tiny_data):
    x = tiny_data["test_images"][:5]
    a = api.predict(cascade, x, "expert", 0.5)
    b = api.predict(cascade, x.astype(np.float32) / 255.0, "expert", 0.5)
    assert a["labels"].shape == (5,) and a["probs"].shape == (5, 10)
    np.testing.assert_allclose(a["probs"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a["exit"], b["exit"])
    np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
    assert set(a["exit"]) <= {0, 1} and (a["flops"] > 0).all()
    # class names stored by training (from the folder names) come back with the labels
    assert cascade.class_names[:2] == ("airplane", "automobile")
    assert [cascade.class_names[k] for k in a["labels"]] == list(a["names"])


def test_single_image_and_batch_of_one(cascade, tiny_data):
    x = tiny_data["test_images"][0]
    one = api.predict(cascade, x, "max_softmax", 0.5)
    assert one["labels"].shape == (1,)
    batch_of_one = api.predict(cascade, x[None], "max_softmax", 0.5)
    np.testing.assert_array_equal(batch_of_one["probs"], one["probs"])


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 32, 32), np.uint8), "no channel axis: grayscale"),
    (np.zeros((2, 32, 32, 1), np.uint8), "3 channels"),
    (np.zeros((2, 28, 28, 3), np.uint8), "32x32"),
    (np.zeros((0, 32, 32, 3), np.uint8), "empty batch"),
    (np.zeros((2, 32, 32, 3), np.int64), "uint8 or float"),
    (np.full((2, 32, 32, 3), np.nan, np.float32), "NaN or inf"),
    (np.full((2, 32, 32, 3), np.inf, np.float64), "NaN or inf"),
    (np.full((2, 32, 32, 3), 7.0, np.float32), r"\[0, 1\]"),
    (np.zeros((2, 2, 32, 32, 3), np.uint8), "shape"),
    (np.zeros((2, 3, 32, 32), np.uint8), "channels first"),
])
def test_bad_images_are_refused(cascade, images, message):
    with pytest.raises(ValueError, match=message):
        api.predict(cascade, images, "max_softmax", 0.5)


@pytest.mark.parametrize("rule, threshold, message", [
    ("expert", 1.5, r"threshold must be a number in \[0, 1\]"),
    ("expert", -0.1, "threshold"),
    ("expert", float("nan"), "threshold"),
    ("expert", "0.5", "threshold must be a number"),
    ("magic", 0.5, "unknown rule"),
])
def test_bad_rule_or_threshold(cascade, tiny_data, rule, threshold, message):
    with pytest.raises(ValueError, match=message):
        api.predict(cascade, tiny_data["test_images"][:2], rule, threshold)


def test_calibrate_argument_errors(cascade, tiny_data):
    x, y = tiny_data["calib_images"], tiny_data["calib_labels"]
    with pytest.raises(ValueError, match="exactly one"):
        api.calibrate(cascade, x, y, "expert")
    with pytest.raises(ValueError, match="labels must have shape"):
        api.calibrate(cascade, x, y[:-1], "expert", max_drop=0.01)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        api.calibrate(cascade, x, y + 10, "expert", max_drop=0.01)
    with pytest.raises(ValueError, match="labels must be integers"):
        api.calibrate(cascade, x, y.astype(float), "expert", max_drop=0.01)
    for bad in (5, 1.0, -0.01, "0.01", True):
        with pytest.raises(ValueError, match=r"max_drop is a fraction in \[0, 1\)"):
            api.calibrate(cascade, x, y, "expert", max_drop=bad)
    with pytest.raises(ValueError, match="flops_budget must be a positive"):
        api.calibrate(cascade, x, y, "expert", flops_budget=0)
    with pytest.raises(ValueError, match="below the cheapest path"):
        api.calibrate(cascade, x, y, "expert", flops_budget=1.0)
    with pytest.raises(ValueError, match="oracle"):
        api.calibrate(cascade, x, y, "oracle", max_drop=0.01)


def test_certified_calibration_is_at_most_as_aggressive_and_bounded(cascade, tiny_data):
    x, y = tiny_data["calib_images"], tiny_data["calib_labels"]
    plain = api.calibrate(cascade, x, y, "max_softmax", max_drop=0.2, save=False)
    certified = api.calibrate(cascade, x, y, "max_softmax", max_drop=0.2, alpha=0.1,
                              save=False)
    assert certified["drop_ucb"] <= 0.2 and certified["alpha"] == 0.1
    assert certified["flops"] >= plain["flops"] - 1e-6  # a margin costs FLOPs, never saves
    with pytest.raises(ValueError, match="alpha"):
        api.calibrate(cascade, x, y, "max_softmax", flops_budget=1e6, alpha=0.1)


def test_predict_needs_a_point_and_checks_labels(tiny_workdir, tiny_data):
    fresh = api.load(tiny_workdir, max_batch=8, warm=False)  # nothing calibrated there
    x = tiny_data["test_images"][:3]
    with pytest.raises(ValueError, match="no rule given and no stored operating point"):
        api.predict(fresh, x)
    with pytest.raises(ValueError, match="no threshold given for rule 'expert'"):
        api.predict(fresh, x, "expert")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        api.predict(fresh, x, "oracle", 0.5, labels=[0, 1, 10])
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        api.load(tiny_workdir, max_batch=0)
    with pytest.raises(ValueError, match="not a folder"):
        api.load(tiny_workdir / "config.json")


def test_load_in_another_precision(tiny_workdir, tiny_data):
    """`compute_dtype`: the same workdir served with segment 0 in float32 and the rest in
    bfloat16 answers nearly as in float32; an unknown precision is named."""
    x = tiny_data["test_images"][:8]
    exact = api.load(tiny_workdir, max_batch=8, warm=False)
    deep = api.load(tiny_workdir, max_batch=8, warm=False, compute_dtype="bfloat16_deep")
    assert deep.model.cfg.compute_dtype == "bfloat16_deep"
    a = api.predict(exact, x, "max_softmax", 0.0)
    b = api.predict(deep, x, "max_softmax", 0.0)
    assert not np.array_equal(a["probs"], b["probs"])    # bfloat16 ran
    np.testing.assert_allclose(b["probs"], a["probs"], atol=0.05)
    with pytest.raises(ValueError, match="compute_dtype"):
        api.load(tiny_workdir, warm=False, compute_dtype="float16")


def test_bfloat16_checked_reruns_its_close_calls_in_float32(api_workdir, tiny_data):
    """bfloat16_checked: refused until its margins are chosen; choose_recheck stores them;
    margins of 1 rerun every answer, so the labels are float32's (logits up to the exit
    that answered), margins of 0 none, so they are bfloat16's."""
    x = tiny_data["test_images"][:8]
    with pytest.raises(ValueError, match="has no precision_check.json"):
        api.load(api_workdir, max_batch=8, warm=False, compute_dtype="bfloat16_checked")
    point = api.choose_recheck(api_workdir, tiny_data["calib_images"][:16], max_batch=8)
    assert api.recheck_path(api_workdir).exists() and len(point["margins"]) == 2
    assert point["heldout_same_label_checked"] == [1.0, 1.0]
    exact = api.load(api_workdir, max_batch=8, warm=False)
    low = api.load(api_workdir, max_batch=8, warm=False, compute_dtype="bfloat16")
    for margin, like in ((1.0, exact), (0.0, low)):
        api.recheck_path(api_workdir).write_text(json.dumps({"margins": [margin] * 2}))
        checked = api.load(api_workdir, max_batch=8, warm=False,
                           compute_dtype="bfloat16_checked")
        assert checked.model.cfg.compute_dtype == "bfloat16"
        for threshold in (0.0, 1.0):      # every image leaves at O1; every one goes deep
            a = api.predict(checked, x, "max_softmax", threshold)
            b = api.predict(like, x, "max_softmax", threshold)
            np.testing.assert_array_equal(a["labels"], b["labels"])
            np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
            routed = run_cascade(checked, x, "max_softmax", threshold)
            assert routed["rechecked"].all() == (margin == 1.0)
        np.testing.assert_array_equal(run_plain(checked, x, 1).argmax(-1),
                                      run_plain(like, x, 1).argmax(-1))
        # the sweep's offline outputs recheck each exit alike
        for o, r in zip(all_outputs(checked, x)["exits"], all_outputs(like, x)["exits"]):
            np.testing.assert_array_equal(o.argmax(-1), r.argmax(-1))
    with pytest.raises(ValueError, match="does not rerun close calls"):
        next(throughput.serve(checked, [x], "max_softmax", 0.5))
    api.recheck_path(api_workdir).write_text(json.dumps({"margins": [0.1]}))
    with pytest.raises(ValueError, match="one margin in"):
        api.load(api_workdir, max_batch=8, warm=False, compute_dtype="bfloat16_checked")
    api.recheck_path(api_workdir).unlink()


def test_calibrated_point_is_stored_and_used_by_default(api_workdir, tiny_data):
    """calibrate stores its point with the workdir; predict without rule/threshold uses it,
    in this process and after a new load; a damaged point file is a clear error."""
    c = api.load(api_workdir, max_batch=8, warm=False)
    x, y = tiny_data["calib_images"], tiny_data["calib_labels"]
    point = api.calibrate(c, x, y, "max_softmax", max_drop=0.1)
    t = tiny_data["test_images"][:6]
    explicit = api.predict(c, t, "max_softmax", point["threshold"])
    for cascade in (c, api.load(api_workdir, max_batch=8, warm=False)):
        assert cascade.operating_point["rule"] == "max_softmax"
        assert cascade.operating_point["threshold"] == point["threshold"]
        default = api.predict(cascade, t)
        np.testing.assert_array_equal(default["exit"], explicit["exit"])
        np.testing.assert_array_equal(default["labels"], explicit["labels"])
    with pytest.raises(ValueError, match="no threshold given for rule 'entropy'"):
        api.predict(c, t, "entropy")
    (api_workdir / api.OPERATING_POINT_FILE).write_text('{"rule": "max_softmax"}')
    with pytest.raises(ValueError, match="operating_point.json is damaged"):
        api.load(api_workdir, max_batch=8, warm=False)
    (api_workdir / api.OPERATING_POINT_FILE).unlink()


def _real_accuracy_and_flops(cascade, x, y, rule, threshold):
    out = api.predict(cascade, x, rule, threshold)
    return float((out["labels"] == y).mean()), float(out["flops"].mean())


def _real_grid(cascade, x, y, rule):
    """(threshold, accuracy, FLOPs) of the real cascade at every threshold of the rule's grid."""
    from cnneb_jax.controller import all_outputs
    from cnneb_jax.sweep import branch_scores, threshold_grid
    grid = threshold_grid(branch_scores(all_outputs(cascade, x.astype(np.float32)), rule, y))
    return [(t, *_real_accuracy_and_flops(cascade, x, y, rule, float(t))) for t in grid]


@pytest.mark.parametrize("rule", ["expert", "max_softmax", "entropy"])
@pytest.mark.parametrize("max_drop", [0.0, 0.15, 0.4])
def test_calibrated_point_meets_the_drop_and_nothing_cheaper_does(cascade, tiny_data, rule,
                                                                  max_drop):
    """On the images it was chosen on, the real cascade at the chosen threshold stays within
    `max_drop` of the last exit, and no threshold of the rule's grid that is cheaper does."""
    x, y = tiny_data["calib_images"], tiny_data["calib_labels"]
    p = api.calibrate(cascade, x, y, rule, max_drop=max_drop)
    acc, flops = _real_accuracy_and_flops(cascade, x, y, rule, p["threshold"])
    ref = p["reference_accuracy"]
    assert acc >= ref - max_drop - 1e-9
    assert acc == pytest.approx(p["accuracy"]) and flops == pytest.approx(p["flops"])
    for t, a, f in _real_grid(cascade, x, y, rule):
        if f < flops - 1e-6:
            assert a < ref - max_drop - 1e-9, (t, a, f)


def test_calibrated_budget_point_is_the_most_accurate_within_budget(cascade, tiny_data):
    x, y = tiny_data["calib_images"], tiny_data["calib_labels"]
    ref = api.calibrate(cascade, x, y, "entropy", max_drop=0.99)
    budget = 0.5 * (ref["flops"] + ref["reference_flops"])
    q = api.calibrate(cascade, x, y, "entropy", flops_budget=budget)
    acc, flops = _real_accuracy_and_flops(cascade, x, y, "entropy", q["threshold"])
    assert flops <= budget + 1e-6
    for t, a, f in _real_grid(cascade, x, y, "entropy"):
        if f <= budget + 1e-6:
            assert a <= acc + 1e-9, (t, a, f)


def _predict_folder(image_folder, root):
    """Class folders, a loose file, a corrupt file and one of the wrong size."""
    import shutil
    from PIL import Image
    for cls in ("cat", "ship"):
        (root / cls).mkdir(parents=True)
        for f in sorted((image_folder / "test" / cls).iterdir())[:2]:
            shutil.copy(f, root / cls / f.name)
    shutil.copy(sorted((image_folder / "test" / "dog").iterdir())[0], root / "loose.JPG")
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (40, 30)).save(root / "wide.png")
    return root


def test_predict_files_gives_a_row_per_file_and_errors_instead_of_crashing(
        cascade, image_folder, tmp_path):
    from cnneb_jax import predictions
    from cnneb_jax.data import list_images, read_image
    root = _predict_folder(image_folder, tmp_path / "new")
    files = list_images(root)
    assert len(files) == 7
    rows = api.predict_files(cascade, files, "max_softmax", 0.5, batch_size=4)
    assert [r["path"] for r in rows] == [str(f) for f in files]
    bad = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(bad) == {"broken.jpg", "wide.png"}
    assert "40x30" in bad["wide.png"]
    good = [r for r in rows if not r["error"]]
    images = np.stack([read_image(r["path"], 32, "none") for r in good])
    ref = api.predict(cascade, images, "max_softmax", 0.5)
    assert [r["label"] for r in good] == list(ref["labels"])
    assert [r["exit"] for r in good] == [f"O{e + 1}" for e in ref["exit"]]
    # equal up to float rounding: files go through in other bucket sizes than the batch of
    # five, and the smallest buckets run XLA's kernels instead of oneDNN's
    np.testing.assert_allclose([r["probability"] for r in good], ref["probs"].max(-1),
                               rtol=1e-5)
    assert [r["class_name"] for r in good] == list(ref["names"])
    summary = predictions.summarize(rows, 2.0, 2, 10.0, cascade.class_names)
    assert summary["files"] == 7 and summary["errors"] == 2
    assert summary["images_per_s"] == 2.5
    assert abs(sum(summary["exit_share"].values()) - 1.0) < 1e-9
    assert summary["folder_labelled"] == 4   # the loose file is in no class folder
    out = tmp_path / "preds.csv"
    predictions.write_csv(rows, out)
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(predictions.COLUMNS) and len(lines) == 8


def test_evaluate_predict_writes_the_csv_and_a_summary(tiny_workdir, image_folder, tmp_path,
                                                       capsys):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import evaluate
    root = _predict_folder(image_folder, tmp_path / "new")
    out = tmp_path / "preds.csv"
    assert evaluate.main(["--workdir", str(tiny_workdir), "--predict", str(root),
                          "--out", str(out), "--rule", "max_softmax", "--threshold", "0.5",
                          "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "7 files, 2 unreadable" in printed and "exits: O1" in printed
    assert len(out.read_text().splitlines()) == 8
    deep = tmp_path / "deep.csv"   # served in another precision: the same files answered
    assert evaluate.main(["--workdir", str(tiny_workdir), "--predict", str(root),
                          "--out", str(deep), "--rule", "max_softmax", "--threshold", "0.5",
                          "--batch-size", "8", "--compute-dtype", "bfloat16_deep"]) == 0
    assert "7 files, 2 unreadable" in capsys.readouterr().out
    assert len(deep.read_text().splitlines()) == 8
    # No operating point stored and none given: a message, not a traceback.
    assert evaluate.main(["--workdir", str(tiny_workdir), "--predict", str(root),
                          "--out", str(out)]) == 1
    assert "no rule given" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(tiny_workdir), "--predict", str(tmp_path / "no"),
                          "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_grayscale_batch_without_a_channel_axis_is_named(cascade):
    """(N, H, W) was once read as one image of H x W with W channels."""
    for shape in ((8, 32, 32), (32, 32)):
        with pytest.raises(ValueError, match=r"have no channel axis: grayscale\?"):
            api.predict(cascade, np.zeros(shape, np.uint8), "max_softmax", 0.5)
