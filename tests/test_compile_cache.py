"""The persistent compilation cache that api.load turns on: its folder and the off switch."""

import pytest

from cnneb_jax import compile_cache


def test_folder_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNEB_COMPILE_CACHE", str(tmp_path / "c"))
    assert compile_cache.cache_dir() == tmp_path / "c"


@pytest.mark.parametrize("off", ["off", "0", "false"])
def test_turned_off(monkeypatch, off):
    monkeypatch.setenv("CNNEB_COMPILE_CACHE", off)
    assert compile_cache.cache_dir() is None and compile_cache.enable() is None


def test_memoised_facts_are_computed_once_and_recomputed_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNEB_COMPILE_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"flops": [1.5, 2.0]}
    assert compile_cache.memo_json("t", "key", compute) == {"flops": [1.5, 2.0]}
    assert compile_cache.memo_json("t", "key", compute) == {"flops": [1.5, 2.0]}
    assert len(calls) == 1                       # the second call read the file
    compile_cache.memo_json("t", "other key", compute)
    assert len(calls) == 2                       # another key is another fact
    for f in (tmp_path / "cnneb-facts").iterdir():
        f.write_text("{not json")
    assert compile_cache.memo_json("t", "key", compute) == {"flops": [1.5, 2.0]}
    assert len(calls) == 3                       # a damaged file is recomputed
    monkeypatch.setenv("CNNEB_COMPILE_CACHE", "off")
    compile_cache.memo_json("t", "key", compute)
    assert len(calls) == 4                       # and so is everything with the cache off


def test_abstract_variables_from_the_memo_equal_tracing(tmp_path, monkeypatch):
    import jax
    from cnneb_jax.configs import get_config
    from cnneb_jax.model import abstract_variables, build_model, init_variables
    monkeypatch.setenv("CNNEB_COMPILE_CACHE", str(tmp_path))
    model = build_model(get_config("tiny"))
    traced = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
    for _ in range(2):   # computed, then read back from the file
        got = abstract_variables(model)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(traced)
        assert jax.tree_util.tree_leaves(got) == jax.tree_util.tree_leaves(traced)
