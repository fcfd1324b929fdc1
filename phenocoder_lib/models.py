"""Keras 3 models: the convolutional VAE (``CVAE``) and the conditional VAE (``CondCVAE``).

Architecture (``conv_layers = (f_1, ..., f_n)``, input ``(H, W, C)``)::

    encoder  image (H, W, C)
             -> n x Conv2D(f_i, 3x3, stride 2, same, ReLU)        H/2^n x W/2^n x f_n
             -> Flatten [-> concat condition vector]
             -> Dense(n_dense_dim, ReLU) -> Dropout
             -> z_mean = Dense(L), z_log_var = Dense(L)
    sampling z = z_mean + exp(z_log_var / 2) * eps,  eps ~ N(0, I) from a seeded SeedGenerator
    decoder  z [-> concat condition vector]
             -> Dense(H/2^n * W/2^n * f_n, ReLU) -> Dropout -> Reshape(H/2^n, W/2^n, f_n)
             -> Conv2DTranspose(f_{n-1}), ..., Conv2DTranspose(f_1)     (3x3, stride 2, ReLU)
             -> Conv2DTranspose(C, 3x3, stride 2) logits; reconstruction = sigmoid(logits)

The decoder mirrors the encoder layer for layer: it starts from the *largest* filter count ``f_n`` at the
bottleneck and goes back through ``f_{n-1} ... f_1`` to the C channels. Starting the decoder from the
smallest count instead (a 1x1x8 bottleneck at 32 px) and adding a full-resolution convolution would cost
more on a CPU than the rest of the network.

Loss (per batch, returned by :meth:`CVAE.compute_loss` so that plain ``fit()`` works)::

    reconstruction_loss = mean over patches of sum over pixels x channels of BCE(x, sigmoid(logits))
    kl_loss             = mean over patches of -1/2 sum_latent (1 + log s^2 - m^2 - s^2)
    loss                = reconstruction_loss + beta * kl_loss

``fit`` reports ``loss``, ``reconstruction_loss`` and ``kl_loss`` (``val_*`` on validation data).

Inputs are a dict ``{"image": (b, H, W, C) float in [0, 1], "condition": (b, n_conditions)}`` (the
condition only for a ``CondCVAE``); a bare image array (CVAE) or an ``(image, condition)`` tuple also work.
``model(inputs)`` returns a dict with ``reconstruction``, ``logits``, ``z_mean``, ``z_log_var`` and ``z``.
Every weight initializer, dropout and the sampling noise take seeds derived from the model's ``seed``,
so two models built with the same arguments are identical.

TensorFlow is imported with this module (Keras with the TensorFlow backend, see
:mod:`phenocoder_lib._backend`); the package imports this module lazily. The settings' checks
(:func:`check_architecture`) and ``model_config.json`` live in :mod:`phenocoder_lib.model_config`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from ._backend import keras
from .model_config import check_architecture
from .training import configure_tensorflow

layers, ops = keras.layers, keras.ops

# Thread pools can only be sized before TensorFlow runs its first op: building a model is the first.
configure_tensorflow()

__all__ = ["CVAE", "CondCVAE", "Sampling", "build_decoder", "build_encoder", "check_architecture", "make_model",
           "summarize"]

_PACKAGE = "phenocoder"


# --------------------------------------------------------------------------------------------------
# Layers and sub-models
# --------------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Sampling(layers.Layer):
    """Reparameterization ``z = z_mean + exp(z_log_var / 2) * eps`` with seeded noise.

    Parameters
    ----------
    seed
        Seed of the layer's ``keras.random.SeedGenerator``; the noise sequence is reproducible
        (``None``: an unseeded generator).
    **kwargs
        Keras ``Layer`` arguments (``name``, ``dtype``). Under a mixed-precision policy the noise is drawn
        in the layer's compute dtype.

    """

    def __init__(self, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs: Any) -> Any:
        """Sample ``z``.

        Parameters
        ----------
        inputs
            ``[z_mean, z_log_var]``, both ``(b, L)``.

        Returns
        -------
        tensor
            ``z``, ``(b, L)`` like ``z_mean``: one fresh noise draw per call.
        """
        z_mean, z_log_var = inputs
        eps = keras.random.normal(ops.shape(z_mean), dtype=self.compute_dtype, seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps

    def compute_output_shape(self, input_shape: Any) -> Any:
        """The shape of ``z``.

        Parameters
        ----------
        input_shape
            Shapes of ``[z_mean, z_log_var]``.

        Returns
        -------
        tuple
            That of ``z_mean``.
        """
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        """The layer's configuration.

        Returns
        -------
        dict
            Keras's layer config with the seed.
        """
        return {**super().get_config(), "seed": self.seed}


def _init(seed: int, k: int) -> dict[str, Any]:
    return {"kernel_initializer": keras.initializers.GlorotUniform(seed=seed * 1000 + k)}


def build_encoder(
    input_shape: tuple[int, int, int],
    conv_layers: Sequence[int],
    n_dense_dim: int,
    n_latent_dim: int,
    dropout: float | None,
    n_conditions: int = 0,
    seed: int = 0,
) -> keras.Model:
    """Functional encoder: inputs ``image`` (and ``condition``), outputs ``[z_mean, z_log_var]``.

    Parameters
    ----------
    input_shape
        ``(height, width, channels)`` of the patches.
    conv_layers
        Filters of the stride-2 3x3 convolutions, in order.
    n_dense_dim
        Width of the dense layer after the convolutions.
    n_latent_dim
        Latent size L (width of ``z_mean`` and ``z_log_var``).
    dropout
        Dropout rate after the dense layer (``None`` or 0: no dropout layer).
    n_conditions
        Width of the condition vector concatenated after Flatten (0: no condition input).
    seed
        Seed of the initializers and dropout.

    Returns
    -------
    keras.Model
        The encoder, named ``"encoder"``: ``image`` (and ``condition``) in, ``[z_mean, z_log_var]`` out.
    """
    image = keras.Input(shape=input_shape, name="image")
    inputs = [image]
    x = image
    for i, filters in enumerate(conv_layers):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu",
                          name=f"encoder_conv_{i + 1}_{filters}", **_init(seed, i))(x)
    x = layers.Flatten(name="encoder_flatten")(x)
    if n_conditions:
        condition = keras.Input(shape=(n_conditions,), name="condition")
        inputs.append(condition)
        x = layers.Concatenate(name="encoder_concat_condition")([x, condition])
    x = layers.Dense(n_dense_dim, activation="relu", name="encoder_dense", **_init(seed, 100))(x)
    if dropout:
        x = layers.Dropout(dropout, seed=seed * 1000 + 101, name="encoder_dropout")(x)
    z_mean = layers.Dense(n_latent_dim, name="z_mean", **_init(seed, 102))(x)
    z_log_var = layers.Dense(n_latent_dim, name="z_log_var", **_init(seed, 103))(x)
    return keras.Model(inputs if n_conditions else image, [z_mean, z_log_var], name="encoder")


def build_decoder(
    input_shape: tuple[int, int, int],
    conv_layers: Sequence[int],
    n_dense_dim: int,
    n_latent_dim: int,
    dropout: float | None,
    n_conditions: int = 0,
    seed: int = 0,
) -> keras.Model:
    """Functional decoder: inputs ``z`` (and ``condition``), output the reconstruction *logits* (H, W, C).

    Parameters
    ----------
    input_shape
        ``(height, width, channels)`` of the patches (the output's shape).
    conv_layers
        Filters of the encoder's convolutions; the decoder mirrors them from the last (the bottleneck is
        ``(H / 2**n, W / 2**n, conv_layers[-1])``).
    n_dense_dim
        Unused: the decoder's dense layer has the bottleneck's size (kept for a signature like
        :func:`build_encoder`'s).
    n_latent_dim
        Latent size L (width of the ``z`` input).
    dropout
        Dropout rate after the dense layer (``None`` or 0: no dropout layer).
    n_conditions
        Width of the condition vector concatenated to ``z`` (0: no condition input).
    seed
        Seed of the initializers and dropout.

    Returns
    -------
    keras.Model
        The decoder, named ``"decoder"``: ``z`` (and ``condition``) in, logits ``(b, H, W, C)`` out.
    """
    del n_dense_dim  # the decoder's dense layer has the bottleneck's size
    h, w, c = input_shape
    factor = 2 ** len(conv_layers)
    bottleneck = (h // factor, w // factor, conv_layers[-1])
    z = keras.Input(shape=(n_latent_dim,), name="z")
    inputs = [z]
    x = z
    if n_conditions:
        condition = keras.Input(shape=(n_conditions,), name="condition")
        inputs.append(condition)
        x = layers.Concatenate(name="decoder_concat_condition")([x, condition])
    x = layers.Dense(bottleneck[0] * bottleneck[1] * bottleneck[2], activation="relu", name="decoder_dense",
                     **_init(seed, 200))(x)
    if dropout:
        x = layers.Dropout(dropout, seed=seed * 1000 + 201, name="decoder_dropout")(x)
    x = layers.Reshape(bottleneck, name="decoder_reshape")(x)
    for i, filters in enumerate(reversed(conv_layers[:-1])):
        x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="relu",
                                   name=f"decoder_deconv_{i + 1}_{filters}", **_init(seed, 210 + i))(x)
    # The last transposed convolution mirrors the encoder's first one (C -> f_1 at stride 2): it maps
    # f_1 channels back to the C image channels at full resolution, as logits.
    logits = layers.Conv2DTranspose(c, 3, strides=2, padding="same", name="decoder_logits",
                                    **_init(seed, 299))(x)
    return keras.Model(inputs if n_conditions else z, logits, name="decoder")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CVAE(keras.Model):
    """Convolutional variational autoencoder (see the module docstring for the architecture and loss).

    Parameters
    ----------
    input_shape
        (height, width, channels) of the patches.
    n_latent_dim
        Latent size L (positive int).
    n_dense_dim
        Width of the encoder's dense layer (positive int).
    conv_layers
        Filters of the stride-2 convolutions (default ``(32, 64, 128)``); height and width must be
        divisible by ``2**len(conv_layers)``.
    dropout
        Dropout rate in [0, 1) after the encoder's and the decoder's dense layer (default 0.25; ``None`` or
        0: none).
    beta
        Weight of the KL term in the loss (>= 0; default 0.01).
    n_conditions
        Width of the condition vector (default 0: a plain CVAE).
    seed
        Seed for the initializers, dropout and sampling noise (default 0).
    **kwargs
        Keras ``Model`` arguments (``name``, ``dtype``).

    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_latent_dim: int,
        n_dense_dim: int,
        conv_layers: Sequence[int] = (32, 64, 128),
        dropout: float | None = 0.25,
        beta: float = 0.01,
        n_conditions: int = 0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        shape, convs = check_architecture(input_shape, conv_layers, n_latent_dim, n_dense_dim, dropout, beta)
        if isinstance(n_conditions, bool) or not isinstance(n_conditions, numbers.Integral) or n_conditions < 0:
            raise ValueError(f"n_conditions={n_conditions!r} must be an int >= 0.")
        self.image_shape = shape
        self.n_latent_dim = int(n_latent_dim)
        self.n_dense_dim = int(n_dense_dim)
        self.conv_layers = convs
        self.dropout = None if dropout is None else float(dropout)
        self.beta = float(beta)
        self.n_conditions = int(n_conditions)
        self.seed = int(seed)
        args = (shape, convs, self.n_dense_dim, self.n_latent_dim, self.dropout, self.n_conditions, self.seed)
        self.encoder = build_encoder(*args)
        self.decoder = build_decoder(*args)
        self.sampling = Sampling(seed=self.seed * 1000 + 300, name="sampling")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def conditional(self) -> bool:
        """Whether the model takes a condition vector."""
        return self.n_conditions > 0

    def build(self, input_shape: Any = None) -> None:
        """Mark the model built (the encoder and decoder are built in ``__init__``).

        Parameters
        ----------
        input_shape
            Ignored.
        """
        self.built = True

    def _split(self, inputs: Any) -> tuple[Any, Any]:
        if isinstance(inputs, dict):
            image, condition = inputs["image"], inputs.get("condition")
        elif isinstance(inputs, (tuple, list)):
            image, condition = inputs[0], (inputs[1] if len(inputs) > 1 else None)
        else:
            image, condition = inputs, None
        if self.conditional and condition is None:
            raise ValueError(
                f"{type(self).__name__} expects a condition vector of width {self.n_conditions}: pass "
                "{'image': x, 'condition': c}."
            )
        if not self.conditional and condition is not None:
            raise ValueError("CVAE has no conditions; pass only the image (or use a CondCVAE).")
        return image, condition

    def encode(self, inputs: Any, training: bool = False) -> tuple[Any, Any]:
        """Encode inputs.

        Parameters
        ----------
        inputs
            An image batch ``(b, H, W, C)`` in [0, 1], ``{"image", "condition"}`` or ``(image, condition)``
            (the condition ``(b, n_conditions)`` only for a ``CondCVAE``).
        training
            Apply dropout (default ``False``: deterministic).

        Returns
        -------
        tuple
            ``(z_mean, z_log_var)``, each ``(b, L)``; no sampling, so deterministic without ``training``.
        """
        image, condition = self._split(inputs)
        enc_in = [ops.convert_to_tensor(image), ops.convert_to_tensor(condition)] if self.conditional else image
        z_mean, z_log_var = self.encoder(enc_in, training=training)
        return z_mean, z_log_var

    def decode(self, z: Any, condition: Any = None, training: bool = False) -> Any:
        """Decode latents.

        Parameters
        ----------
        z
            Latents (b, L).
        condition
            Condition vectors ``(b, n_conditions)`` (a ``CondCVAE`` only; ``None`` for a ``CVAE``).
        training
            Apply dropout (default ``False``).

        Returns
        -------
        tensor
            The reconstruction (sigmoid of the decoder logits), (b, H, W, C).
        """
        dec_in = [ops.convert_to_tensor(z), ops.convert_to_tensor(condition)] if self.conditional else z
        return ops.sigmoid(self.decoder(dec_in, training=training))

    def call(self, inputs: Any, training: bool = False) -> dict[str, Any]:
        """Encode, sample ``z`` and decode.

        Parameters
        ----------
        inputs
            As for :meth:`encode`.
        training
            Apply dropout (default ``False``; ``z`` is sampled either way).

        Returns
        -------
        dict
            ``reconstruction`` (sigmoid of the logits) and ``logits``, ``(b, H, W, C)``; ``z_mean``,
            ``z_log_var`` and the sampled ``z``, ``(b, L)``. In the policy's compute dtype.
        """
        image, condition = self._split(inputs)
        enc_in = [image, condition] if self.conditional else image
        z_mean, z_log_var = self.encoder(enc_in, training=training)
        z = self.sampling([z_mean, z_log_var])
        dec_in = [z, condition] if self.conditional else z
        logits = self.decoder(dec_in, training=training)
        return {"reconstruction": ops.sigmoid(logits), "logits": logits, "z_mean": z_mean,
                "z_log_var": z_log_var, "z": z}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The loss of a batch (see the module docstring); updates the loss trackers.

        Parameters
        ----------
        x
            The inputs, as for :meth:`encode`; the image is also the target.
        y
            Unused (an autoencoder's target is its input).
        y_pred
            The output of :meth:`call` (``logits``, ``z_mean`` and ``z_log_var`` are used).
        sample_weight
            Unused (every patch weighs the same).
        training
            Unused (the loss is the same in training and validation).

        Returns
        -------
        tensor
            ``reconstruction_loss + beta * kl_loss`` (float32).
        """
        del y, sample_weight, training
        image, _ = self._split(x)
        image = ops.cast(image, "float32")
        # Under a mixed-precision policy the layers compute in bfloat16/float16: the loss stays float32.
        logits = ops.cast(y_pred["logits"], "float32")
        # Binary cross-entropy from logits (stable): max(l, 0) - l * x + log(1 + exp(-|l|)).
        bce = ops.relu(logits) - logits * image + ops.log1p(ops.exp(-ops.abs(logits)))
        reconstruction = ops.mean(ops.sum(bce, axis=(1, 2, 3)))
        z_mean, z_log_var = ops.cast(y_pred["z_mean"], "float32"), ops.cast(y_pred["z_log_var"], "float32")
        kl = ops.mean(-0.5 * ops.sum(1.0 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=1))
        self.reconstruction_loss_tracker.update_state(reconstruction)
        self.kl_loss_tracker.update_state(kl)
        return reconstruction + self.beta * kl

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (Keras saves the weights separately).

        Returns
        -------
        dict
            Arguments of :class:`CVAE`.
        """
        base = super().get_config()
        base = {k: v for k, v in base.items() if k in ("name", "trainable", "dtype")}
        return {
            **base,
            "input_shape": list(self.image_shape),
            "n_latent_dim": self.n_latent_dim,
            "n_dense_dim": self.n_dense_dim,
            "conv_layers": list(self.conv_layers),
            "dropout": self.dropout,
            "beta": self.beta,
            "n_conditions": self.n_conditions,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CVAE:
        """Rebuild the model from :meth:`get_config`.

        Parameters
        ----------
        config
            The configuration, as :meth:`get_config` returns it (``dtype`` and ``name`` included).

        Returns
        -------
        CVAE
            The model (freshly initialized weights; Keras loads the saved ones afterwards).
        """
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CondCVAE(CVAE):
    """Conditional CVAE: the condition vector joins the encoder's features and the latent.

    The condition is concatenated to the encoder's flattened convolution features and to ``z`` before
    decoding.

    Parameters
    ----------
    input_shape
        (height, width, channels) of the patches.
    n_latent_dim
        Latent size L.
    n_dense_dim
        Width of the encoder's dense layer.
    n_conditions
        Width of the condition vector (>= 1; keyword-only).
    **kwargs
        The other arguments of :class:`CVAE` (``conv_layers``, ``dropout``, ``beta``, ``seed``, ``name``, ``dtype``).
    """

    def __init__(self, input_shape: Sequence[int], n_latent_dim: int, n_dense_dim: int, *,
                 n_conditions: int, **kwargs: Any) -> None:
        if isinstance(n_conditions, bool) or not isinstance(n_conditions, numbers.Integral) or n_conditions < 1:
            raise ValueError(f"n_conditions={n_conditions!r}: a CondCVAE needs a condition vector of width >= 1.")
        super().__init__(input_shape, n_latent_dim, n_dense_dim, n_conditions=n_conditions, **kwargs)


def make_model(
    *,
    input_shape: Sequence[int],
    n_latent_dim: int,
    n_dense_dim: int,
    conv_layers: Sequence[int],
    dropout: float | None,
    beta: float,
    n_conditions: int,
    seed: int,
    name: str | None = None,
) -> CVAE:
    """Build a :class:`CondCVAE` when ``n_conditions > 0``, else a :class:`CVAE`.

    Parameters
    ----------
    input_shape
        (height, width, channels) of the patches.
    n_latent_dim
        Latent size L.
    n_dense_dim
        Width of the encoder's dense layer.
    conv_layers
        Filters of the stride-2 convolutions.
    dropout
        Dropout rate after the dense layers (``None`` or 0: none).
    beta
        Weight of the KL term.
    n_conditions
        Width of the condition vector; 0 builds a :class:`CVAE`, more a :class:`CondCVAE`.
    seed
        Seed of the initializers, dropout and sampling noise.
    name
        Keras name of the model (default: the class's).

    Returns
    -------
    CVAE
        The untrained model.
    """
    kwargs = dict(input_shape=input_shape, n_latent_dim=n_latent_dim, n_dense_dim=n_dense_dim,
                  conv_layers=conv_layers, dropout=dropout, beta=beta, seed=seed)
    if name is not None:
        kwargs["name"] = name
    if n_conditions:
        return CondCVAE(n_conditions=n_conditions, **kwargs)
    return CVAE(**kwargs)


def summarize(model: CVAE, config: dict[str, Any] | None = None) -> str:
    """A model's configuration and its encoder's and decoder's layer tables, as text.

    Parameters
    ----------
    model
        The model.
    config
        Its configuration (``model_config.json``); the dataset settings and condition encoding are left out.

    Returns
    -------
    str
        One line per setting, then the Keras summaries.
    """
    lines = [f"model: {type(model).__name__} {(config or {}).get('model_name', model.name)}"]
    skip = {"dataset_settings", "conditions_encoder"}
    lines += [f"  {key}: {value}" for key, value in (config or {}).items() if key not in skip]
    for part in (model.encoder, model.decoder):
        part.summary(print_fn=lambda s, line_break=True: lines.append(s))
    return "\n".join(lines)
