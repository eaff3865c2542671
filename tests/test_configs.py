import pytest

from cnneb_jax.configs import CONFIGS, get_config


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
    ({"flip": "sometimes"}, "flip must be random or alternate"),
    ({"expert_inputs": "all"}, "expert_inputs must be"),
])
def test_bad_overrides_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("cifar", overrides)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown config"):
        get_config("resnet")


def test_second_exit_variant():
    assert CONFIGS["cifar_2exit"].branch_points == ("Mixed_5b", "Mixed_6e")
