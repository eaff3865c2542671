"""cnneb-jax: test-cost-sensitive CNNs with expert branches (CNN-EB) in JAX and Flax.

The public API, each name imported from its module when first used (so that importing
one module, e.g. the JAX-and-numpy-only `cnneb_jax.serving`, never loads the rest):

    import cnneb_jax as cj
    cj.keep_freed_memory()     # first, before NumPy or JAX start threads: faster on a CPU
    cfg = cj.with_classes(cj.get_config("cifar"), ...)        # configs are data
    data = cj.load_dataset(cfg, "../shared/datasets/cifar10-jpeg")
    cj.train_backbone(cfg, data, "runs/cifar"); cj.train_expert(cfg, data, "runs/cifar")
    cascade = cj.load("runs/cifar")                           # a workdir or a release
    cj.calibrate(cascade, data["calib_images"], data["calib_labels"], max_drop=0.01)
    out = cj.predict(cascade, images)                         # real early exit, batched
    rows = cj.predict_files(cascade, paths)                   # files in, one row each
    for out in cj.serve(cascade, batches): ...                # a stream of batches
    cj.run_sweep(cascade, data, "runs/cifar/sweep")           # Table 2, certified points
    cj.export_cascade(cascade, "export/", rule, threshold)    # jax.export programs
    exported = cj.load_exported("export/")                    # then cnneb_jax.serving.predict
    cj.save_release("runs/cifar", "release/", command, test_dir)

The command-line programs (`cnneb-train`, `cnneb-evaluate`, `cnneb-export`) call the same
functions; see cnneb_jax/cli/.
"""

from __future__ import annotations

import importlib

# name -> (module, attribute in it)
_PUBLIC = {
    "Config": ("configs", "Config"),
    "get_config": ("configs", "get_config"),
    "load_dataset": ("data", "load_dataset"),
    "with_classes": ("splits", "with_classes"),
    "train_backbone": ("backbone_stage", "train_backbone"),
    "train_expert": ("expert_stage", "train_expert"),
    "load_trained": ("workdir", "load_trained"),
    "save_release": ("workdir", "save_release"),
    "load": ("api", "load"),
    "predict": ("api", "predict"),
    "predict_files": ("api", "predict_files"),
    "calibrate": ("api", "calibrate"),
    "serve": ("throughput", "serve"),
    "run_sweep": ("report", "sweep"),
    "export_cascade": ("export", "export_cascade"),
    "load_exported": ("serving", "load"),
    "keep_freed_memory": ("host_memory", "keep_freed_memory"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        # Submodules (cnneb_jax.serving, ...) import as usual.
        raise AttributeError(f"module 'cnneb_jax' has no attribute {name!r}")
    module, attr = _PUBLIC[name]
    value = getattr(importlib.import_module(f"cnneb_jax.{module}"), attr)
    globals()[name] = value   # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
