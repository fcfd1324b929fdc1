"""Keras with the TensorFlow backend: import ``keras`` from here, never directly.

Keras 3 reads the ``KERAS_BACKEND`` environment variable once, at its first import. The models and the
training here need TensorFlow (the ``tf.data`` input pipeline, thread-pool sizing, TensorBoard images),
so this module sets ``KERAS_BACKEND=tensorflow`` when the user has not chosen a backend, and raises a
``RuntimeError`` naming the fix when the user chose another one (or Keras was already imported with
another), instead of failing later inside training. Importing this module imports TensorFlow.
"""

from __future__ import annotations

import os

#: The only Keras backend the models support.
BACKEND = "tensorflow"


def _check(chosen: str) -> None:
    if chosen.lower() != BACKEND:
        raise RuntimeError(
            f"KERAS_BACKEND={chosen!r}: Phenocoder's models need the TensorFlow backend. Unset KERAS_BACKEND or "
            f"set KERAS_BACKEND={BACKEND} before the first import of keras."
        )


def _import_keras():
    # Only a default: a backend the user set is kept, and refused if it is not TensorFlow.
    _check(os.environ.setdefault("KERAS_BACKEND", BACKEND))
    import keras  # after the environment variable: Keras reads it at its first import

    _check(keras.backend.backend())
    return keras


keras = _import_keras()

__all__ = ["BACKEND", "keras"]
