"""TensorFlow's environment, set before it is first imported.

TensorFlow sits under tfds, tf.data, Keras and TensorBoard's writer. Each function that
needs one of them imports it inside, after `quiet()`; importing a cnneb_jax module never
loads or configures TensorFlow by itself.
"""

from __future__ import annotations

import os


def quiet() -> None:
    """TensorFlow prints C++ start-up lines on import; nothing here needs them, and
    oneDNN's reordered float ops (its one message) do not matter for decoding images.
    Only defaults: a user's own setting wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
