"""What several training tasks share: the model they start from, the frozen parts they load, the UNet they
differentiate and the optimizer."""

from __future__ import annotations

from pathlib import Path


def model_source(config, workdir: Path, main_process: bool) -> str:
    """The diffusers folder or hub id training starts from; ``new`` is a random model (``config.new_model``) that
    process 0 writes to ``WORKDIR/initial-model`` (the same on every run with the same seed)."""
    if config.model != "new":
        return config.model
    from jax.experimental import multihost_utils

    from ip2p_jax.training.new_model import INITIAL_MODEL, write_new_model

    folder = workdir / INITIAL_MODEL
    if main_process and not (folder / "model_index.json").is_file():
        write_new_model(folder, **config.new_model.to_dict(), seed=config.seed)
    multihost_utils.sync_global_devices("initial model written")
    return str(folder)


def training_unet(config, unet):
    """The UNet the train step differentiates: ``unet`` with the config's rematerialisation (``remat``: ``none``,
    ``transformer`` or ``resnet_and_transformer``, ``ip2p_jax/models/unet.py``) and attention kernel
    (``attention_backend``, ``partitioned_backend`` of ``models/attention_kernels.py``: the step is one
    GSPMD-partitioned jit over every device). Sampling and evaluation use ``unet`` itself. An unknown setting is a
    ``ValueError``."""
    import jax

    from ip2p_jax.models.attention_kernels import partitioned_backend

    backend = partitioned_backend(config.attention_backend, unet.dtype, jax.device_count())
    return unet.clone(remat=config.remat, attention_backend=backend)


def optimizer(config):
    """AdamW (constant rate, clipping, accumulation) from the config's settings."""
    from ip2p_jax.training.state import make_optimizer

    return make_optimizer(
        config.optim.learning_rate,
        weight_decay=config.optim.weight_decay,
        max_grad_norm=config.optim.max_grad_norm,
        accumulation=config.optim.accumulation,
    )
