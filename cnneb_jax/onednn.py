"""oneDNN's CPU convolutions inside jitted JAX code, through XLA's FFI.

XLA:CPU's convolutions run 1.2-3.9x slower than oneDNN's in float32 and 2.5-5.5x in
bfloat16 on this project's machines (docs/experiments.md §14), and they take over 90% of an
Inception v3 forward. `native/onednn_conv.cc` wraps oneDNN's forward (with BatchNorm's
scale and offset and a ReLU fused in), backward-data and backward-weights convolutions, and
its pooling, as FFI handlers; this module builds it once, loads it, and offers `conv`
(differentiable), `conv_affine_relu` and `pool` (inference).

The library comes from the package registry: oneDNN 3.2 (`onednn-cpu-gomp`, GNU OpenMP)
with its own headers (`onednn-devel-cpu-gomp`), compiled with the system's C++ compiler
against the FFI headers that jaxlib ships. `python -m cnneb_jax.onednn` builds it
(`setup.sh` does); without it every config runs XLA's (the config's `onednn`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).parent / "native" / "onednn_conv.cc"
_WHEELS = ("onednn-cpu-gomp==2023.2.0", "onednn-devel-cpu-gomp==2023.2.0")
_TARGETS = ("cnneb_onednn_conv_fwd", "cnneb_onednn_conv_bwd_data",
            "cnneb_onednn_conv_bwd_weights", "cnneb_onednn_pool", "cnneb_onednn_pool_train",
            "cnneb_onednn_pool_bwd", "cnneb_onednn_bn_relu_train", "cnneb_onednn_bn_relu_bwd")


class OneDNNUnavailable(RuntimeError):
    """The oneDNN kernels are not built here (or cannot be)."""


def cache_dir() -> Path:
    """Where the wheels are unpacked and the library built ($CNNEB_ONEDNN_DIR overrides)."""
    env = os.environ.get("CNNEB_ONEDNN_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnneb_jax" / "onednn"


def library_path() -> Path:
    """The built library, named for what it was built from (source, wheels, jaxlib), so a
    changed source or a new jaxlib never loads an old build."""
    digest = hashlib.sha256(_SOURCE.read_bytes())
    digest.update(" ".join(_WHEELS).encode())
    digest.update(importlib.metadata.version("jaxlib").encode())
    return cache_dir() / f"libcnneb_onednn-{digest.hexdigest()[:12]}.so"


def build(verbose: bool = True) -> Path:
    """Downloads the oneDNN wheels (once) and compiles the FFI library. Raises
    OneDNNUnavailable with the reason when it cannot."""
    out = library_path()
    if out.exists():
        return out
    root = cache_dir()
    lib, include = root / "lib" / "libdnnl.so.3", root / "include"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise OneDNNUnavailable("no C++ compiler (g++) on PATH")
    if not (lib.exists() and include.exists()):
        say = print if verbose else (lambda *a, **k: None)
        say(f"onednn: downloading {' and '.join(_WHEELS)} into {root}")
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                  "-d", tmp, *_WHEELS], capture_output=True, text=True)
            if got.returncode != 0:
                raise OneDNNUnavailable(f"pip download failed: {got.stderr.strip()[-500:]}")
            for wheel in Path(tmp).glob("*.whl"):
                zipfile.ZipFile(wheel).extractall(Path(tmp) / "unpacked")
            data = list((Path(tmp) / "unpacked").glob("*.data/data"))
            lib.parent.mkdir(parents=True, exist_ok=True)
            for d in data:
                if (d / "lib" / "libdnnl.so.3").exists():
                    shutil.copy(d / "lib" / "libdnnl.so.3", lib)
                if (d / "include" / "oneapi").exists():
                    shutil.rmtree(include, ignore_errors=True)
                    shutil.copytree(d / "include", include)
        if not (lib.exists() and include.exists()):
            raise OneDNNUnavailable(f"the wheels {_WHEELS} did not hold libdnnl.so.3 and headers")
    tmp_out = out.with_suffix(f".tmp{os.getpid()}")
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(_SOURCE), f"-I{include}",
           f"-I{jax.ffi.include_dir()}", f"-L{lib.parent}", "-l:libdnnl.so.3",
           f"-Wl,-rpath,{lib.parent}", "-o", str(tmp_out)]
    got = subprocess.run(cmd, capture_output=True, text=True)
    if got.returncode != 0:
        raise OneDNNUnavailable(f"compiling {_SOURCE.name} failed:\n{got.stderr[-2000:]}")
    tmp_out.rename(out)  # atomic: a crash mid-build never leaves a half library behind
    return out


@functools.cache
def _library() -> ctypes.CDLL | str:
    """Loads and registers the kernels; returns the library, or why it cannot."""
    path = library_path()
    if not path.exists():
        return f"not built ({path} is missing; run `python -m cnneb_jax.onednn`)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError as e:
        return f"cannot load {path}: {e}"
    for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
    return lib


def _load() -> str | None:
    lib = _library()
    return lib if isinstance(lib, str) else None


def available() -> bool:
    """True when the kernels are built and loaded (CPU only)."""
    return _load() is None


def require() -> None:
    why = _load()
    if why is not None:
        raise OneDNNUnavailable(f"onednn='on' needs the oneDNN kernels, which are {why}")


MODES = ("auto", "on", "off", "inference")


def use(mode: str, dtype, training: bool = False) -> bool:
    """Whether an op on `dtype` runs oneDNN's kernels under the config's `onednn` mode:
    "off" never, "on" always (an error where they are not built), "auto" where they are
    built and the default backend is the CPU, "inference" as "auto" but never in a
    training step (`training`). Float64 stays on XLA."""
    if mode == "off" or (mode == "inference" and training):
        return False
    if mode == "on":
        require()
        if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"onednn='on' runs float32 or bfloat16, not {dtype}")
        return True
    if mode not in MODES:
        raise ValueError(f"onednn must be one of {MODES}, not {mode!r}")
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16) or jax.default_backend() != "cpu":
        return False
    if not available():
        _warn_unavailable(_load())
        return False
    return True


@functools.cache
def _warn_unavailable(why: str) -> None:
    # Once per process: "auto" still runs, on XLA's slower kernels, but not silently.
    warnings.warn(f"oneDNN's CPU kernels are {why}; running XLA's (slower) instead "
                  "(config onednn=off silences this)", stacklevel=3)


def export_checks() -> list:
    """What `jax.export` must be told to serialise a program that calls these kernels (for
    this machine's own compilation cache only: they exist nowhere else)."""
    return [jax.export.DisabledSafetyCheck.custom_call(name) for name in _TARGETS]


def axis_pads(size: int, k: int, s: int, padding: str) -> tuple[int, int, int]:
    """(output size, padding before, padding after) of one spatial axis under TF/XLA's
    SAME or VALID (SAME: the extra pixel goes after). The convs here and pooling.py use it."""
    if padding == "VALID":
        return (size - k) // s + 1, 0, 0
    if padding != "SAME":
        raise ValueError(f"padding must be SAME or VALID, got {padding!r}")
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


def _geometry(x_shape, w_shape, strides: tuple[int, int], padding: str
              ) -> tuple[dict, tuple[int, int, int, int]]:
    """The FFI attributes of a conv (strides, explicit padding) and its output shape."""
    (n, h, w, _), (kh, kw, _, o) = x_shape, w_shape
    (ho, pt, pb), (wo, pl, pr) = (axis_pads(h, kh, strides[0], padding),
                                  axis_pads(w, kw, strides[1], padding))
    attrs = dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
                 pad_top=np.int64(pt), pad_bottom=np.int64(pb), pad_left=np.int64(pl),
                 pad_right=np.int64(pr))
    return attrs, (n, ho, wo, o)


def conv_affine_relu(x: jax.Array, w: jax.Array, scale: jax.Array | None = None,
                     offset: jax.Array | None = None, *, strides: tuple[int, int] = (1, 1),
                     padding: str = "SAME", relu: bool = False,
                     cache_kernel: bool = False, exclusive: bool = False) -> jax.Array:
    """relu(conv(x, w) * scale + offset) in one oneDNN primitive (not differentiable): the
    inference ConvBN with BatchNorm's per-channel scale and offset (float32). x is NHWC and
    w HWIO, both float32 or both bfloat16. `cache_kernel`: keep the kernel oneDNN packs
    (bfloat16) for the next call with the same kernel, as inference calls repeat.
    `exclusive`: run while no other exclusive oneDNN call runs (training's calls are)."""
    require()
    g, out_shape = _geometry(x.shape, w.shape, strides, padding)
    out = jax.ShapeDtypeStruct(out_shape, x.dtype)
    affine = scale is not None
    one = jnp.ones((1,), jnp.float32)
    scale = one if scale is None else scale.astype(jnp.float32)
    offset = jnp.zeros_like(scale) if offset is None else offset.astype(jnp.float32)
    return jax.ffi.ffi_call("cnneb_onednn_conv_fwd", out)(
        x, w.astype(x.dtype), scale, offset, affine=affine, relu=relu, cache=cache_kernel,
        exclusive=exclusive, **g)


def pool(x: jax.Array, window: int, stride: int, pads: tuple[tuple[int, int], ...],
         out_hw: tuple[int, int], average: bool, exclusive: bool = False) -> jax.Array:
    """Max pooling, or average pooling over each window's real pixels, of NHWC `x` with
    explicit ((top, bottom), (left, right)) padding (not differentiable; pooling.py adds the
    gradient)."""
    require()
    out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, x.shape[3]), x.dtype)
    return jax.ffi.ffi_call("cnneb_onednn_pool", out)(
        x, average=average, exclusive=exclusive, **_pool_attrs(window, stride, pads))


def _pool_attrs(window: int, stride: int, pads: tuple[tuple[int, int], ...]) -> dict:
    (pt, pb), (pl, pr) = pads
    return dict(window=np.int64(window), stride=np.int64(stride), pad_top=np.int64(pt),
                pad_bottom=np.int64(pb), pad_left=np.int64(pl), pad_right=np.int64(pr))


def max_pool_train(x: jax.Array, window: int, stride: int, pads: tuple[tuple[int, int], ...],
                   out_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Max pooling for training: the pooled NHWC array and oneDNN's workspace (uint8, one
    byte per output value: where each maximum came from), which `pool_grad` reads."""
    require()
    shape = (x.shape[0], *out_hw, x.shape[3])
    outs = (jax.ShapeDtypeStruct(shape, x.dtype), jax.ShapeDtypeStruct(shape, jnp.uint8))
    return jax.ffi.ffi_call("cnneb_onednn_pool_train", outs)(
        x, **_pool_attrs(window, stride, pads))


def pool_grad(dy: jax.Array, workspace: jax.Array | None, x_shape: tuple[int, ...],
              window: int, stride: int, pads: tuple[tuple[int, int], ...],
              average: bool) -> jax.Array:
    """The gradient of `pool` (average) or `max_pool_train` (max, from its workspace) with
    respect to its input of shape `x_shape`."""
    require()
    if workspace is None:
        workspace = jnp.zeros((1,), jnp.uint8)  # average pooling reads none
    return jax.ffi.ffi_call("cnneb_onednn_pool_bwd", jax.ShapeDtypeStruct(x_shape, dy.dtype))(
        dy, workspace, average=average, **_pool_attrs(window, stride, pads))


@functools.cache
def _bn_workspace_bytes(shape: tuple[int, ...], dtype, eps: float) -> int:
    lib = _library()
    f = lib.cnneb_onednn_bn_workspace_bytes
    f.restype = ctypes.c_int64
    f.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_int, ctypes.c_float]
    got = f(*shape, int(jnp.dtype(dtype) == jnp.bfloat16), eps)
    if got < 0:
        raise OneDNNUnavailable(f"oneDNN has no BatchNorm for {shape} {jnp.dtype(dtype)}")
    return got


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def batchnorm_relu(x: jax.Array, shift: jax.Array, eps: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm without scale, then ReLU, over NHWC `x` (float32 or
    bfloat16) with a float32 `shift` per channel: (relu((x - mean) / sqrt(var + eps) + shift),
    mean, var), the batch's statistics in float32 (var: the population variance). One oneDNN
    primitive forward, one backward (which reads where the ReLU passed from a workspace).
    The statistics are for the running averages: no gradient flows back through them."""
    return _batchnorm_relu_fwd(x, shift, eps)[0]


def _batchnorm_relu_fwd(x, shift, eps):
    require()
    stats = jax.ShapeDtypeStruct((x.shape[3],), jnp.float32)
    ws = jax.ShapeDtypeStruct((_bn_workspace_bytes(tuple(x.shape), x.dtype, eps),), jnp.uint8)
    y, mean, var, workspace = jax.ffi.ffi_call(
        "cnneb_onednn_bn_relu_train", (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats, ws))(
        x, shift.astype(jnp.float32), eps=np.float32(eps))
    return (y, mean, var), (x, shift, mean, var, workspace)


def _batchnorm_relu_bwd(eps, res, cts):
    x, shift, mean, var, workspace = res
    dy = cts[0].astype(x.dtype)
    dx, dshift = jax.ffi.ffi_call(
        "cnneb_onednn_bn_relu_bwd", (jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     jax.ShapeDtypeStruct(mean.shape, jnp.float32)))(
        x, mean, var, workspace, dy, eps=np.float32(eps))
    return dx, dshift.astype(shift.dtype)


batchnorm_relu.defvjp(_batchnorm_relu_fwd, _batchnorm_relu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int] = (1, 1),
         padding: str = "SAME") -> jax.Array:
    """conv(x, w) with oneDNN's kernels forward and backward (NHWC, HWIO)."""
    return conv_affine_relu(x, w, strides=strides, padding=padding, exclusive=True)


def _conv_fwd(x, w, strides, padding):
    return conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, res, dy):
    x, w = res
    g, _ = _geometry(x.shape, w.shape, strides, padding)
    dy = dy.astype(x.dtype)
    dx = jax.ffi.ffi_call("cnneb_onednn_conv_bwd_data", jax.ShapeDtypeStruct(x.shape, x.dtype))(
        dy, w, **g)
    dw = jax.ffi.ffi_call("cnneb_onednn_conv_bwd_weights",
                          jax.ShapeDtypeStruct(w.shape, x.dtype))(x, dy, **g)
    return dx, dw.astype(w.dtype)


conv.defvjp(_conv_fwd, _conv_bwd)


def main() -> None:
    """`python -m cnneb_jax.onednn`: build the kernels, or say why they cannot be built."""
    try:
        path = build()
    except OneDNNUnavailable as e:
        print(f"onednn: not built, XLA's convolutions will be used: {e}", file=sys.stderr)
        sys.exit(1)
    why = _load()
    if why is not None:
        print(f"onednn: built {path} but {why}", file=sys.stderr)
        sys.exit(1)
    print(f"onednn: ready ({path})")


if __name__ == "__main__":
    main()
