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
