import pytest

from cnneb_jax.configs import CONFIGS, Config, get_config, validate
from cnneb_jax.workdir import EXPERT_STAGE_FIELDS


def test_default_is_cifar_with_one_branch_point():
    cfg = get_config("cifar")
    assert cfg.image_size == 32 and cfg.branch_points == ("Mixed_5b",)


def test_overrides_are_typed():
    cfg = get_config("cifar", {"epochs": "3", "width": "0.5", "use_pool_5a": "true",
                               "branch_points": "Mixed_5b,Mixed_6e"})
    assert cfg.epochs == 3 and cfg.width == 0.5 and cfg.use_pool_5a is True
    assert cfg.branch_points == ("Mixed_5b", "Mixed_6e")


@pytest.mark.parametrize("overrides, message", [
    ({"nope": "1"}, "unknown config field"),
    ({"epochs": "many"}, "bad value for epochs"),
    ({"branch_points": "Conv2d_1a_3x3"}, "Mixed_"),
    ({"branch_points": "Mixed_6e,Mixed_5b"}, "network order"),
    ({"flip": "sometimes"}, "flip must be one of random, alternate"),
    ({"expert_inputs": "all"}, "expert_inputs must be"),
    ({"batch_size": "0"}, "batch_size must be >= 1"),
    ({"width": "0"}, "width must be > 0"),
    ({"lr": "nan"}, "lr must be > 0"),
    ({"ema_decay": "1"}, r"ema_decay must be in \[0.0, 1.0\)"),
    ({"padding": "same"}, "padding must be one of SAME, VALID"),
    ({"calib_size": "7000"}, "calib_size .* must be smaller than val_size"),
    ({"calib_size": "6000"}, "calib_size .* must be smaller than val_size"),
    ({"pad_crop": "32"}, "pad_crop must be < image_size"),
    ({"whiten_stem": "1"}, "stem_channels must be in"),
    ({"lowres_size": "32"}, r"lowres_size must be 0 \(off\) or in \[8, image_size"),
    ({"branch_points": ""}, "at least one"),
    ({"lr_start": "1.5"}, r"lr_start must be in \[0.0, 1.0\]"),
    ({"lookahead_every": "40", "ema_decay": "0"}, "lookahead_every needs ema_decay > 0"),
])
def test_bad_overrides_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("cifar", overrides)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown config"):
        get_config("resnet")


def test_second_exit_variant():
    assert CONFIGS["cifar_2exit"].branch_points == ("Mixed_5b", "Mixed_6e")


def test_every_named_config_is_valid_and_python_edits_are_checked():
    for name in CONFIGS:
        validate(CONFIGS[name])
    with pytest.raises(ValueError, match="config field width must be float"):
        validate(CONFIGS["cifar"].replace(width="wide"))
    with pytest.raises(ValueError, match="config field epochs must be int"):
        validate(CONFIGS["cifar"].replace(epochs=2.5))


def test_default_expert_is_the_papers_and_the_ablation_is_a_variant():
    # Issue 11, item 1: the proposed expert is the paper's E1; the confidence inputs are
    # an ablation with its own learning rate (both chosen on calibration, RESULTS §3).
    assert CONFIGS["cifar"].expert_inputs == "paper"
    ablation = CONFIGS["cifar_confidence"]
    assert ablation.expert_inputs == "paper+confidence"
    assert ablation.expert_lr != Config().expert_lr
    # the short default budget for its experts, on cifar's backbone (so that
    # --backbone-from pretrained/cifar accepts it): nothing else differs
    cifar = CONFIGS["cifar"]
    assert ablation.replace(**{f: getattr(cifar, f) for f in EXPERT_STAGE_FIELDS}) == cifar
    assert (ablation.expert_epochs, ablation.expert_views) == (
        Config().expert_epochs, Config().expert_views)
    assert CONFIGS["cifar_2exit"].replace(branch_points=cifar.branch_points, **{
        f: getattr(cifar, f) for f in EXPERT_STAGE_FIELDS}) == cifar


def test_cifar_experts_take_the_cross_validated_budget():
    """`cifar` differs from the default only in its experts' budget (RESULTS §2) and its
    backbone's epochs."""
    import dataclasses
    cifar, default = CONFIGS["cifar"], Config()
    differ = {f.name for f in dataclasses.fields(Config)
              if getattr(cifar, f.name) != getattr(default, f.name)}
    assert differ == {"expert_views", "expert_epochs", "expert_lr", "aux5b_lr", "aux5b_epochs",
                      # the 20-epoch backbone (experiments.md §32)
                      "epochs", "lowres_epochs", "warmup_epochs"}
    assert (cifar.epochs, cifar.lowres_epochs, cifar.warmup_epochs) == (20, 15.0, 4.6)
    assert (cifar.expert_lr, cifar.expert_epochs, cifar.aux5b_lr, cifar.aux5b_epochs) == (
        0.27, 2048, 3e-3, 8)
    validate(cifar)


def test_the_augmentations_in_use_say_what_they_assume():
    from cnneb_jax.configs import augmentations_in_use
    lines = augmentations_in_use(get_config("cifar"))
    assert any(l.startswith("flip=alternate") and "mirror image shows the same class" in l
               for l in lines)
    assert any(l.startswith("pad_crop=2") for l in lines)
    none = augmentations_in_use(get_config("cifar", {"flip": "none", "pad_crop": "0"}))
    assert not any(l.startswith(("flip", "pad_crop")) for l in none)
