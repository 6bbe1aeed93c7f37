"""The KL autoencoder on both pictures of every pair (a batch of ``B`` pairs is ``2B`` images;
``training/autoencoder.py``), from ``config.new_model.vae`` (``model = "new"``) or a folder's ``vae/``."""

from __future__ import annotations

import functools
from pathlib import Path

from ip2p_jax.training.tasks import Task
from ip2p_jax.training.tasks.common import optimizer


def build(config, workdir: Path, main_process: bool) -> Task:
    """The autoencoder task of ``config`` (``configs/shapes_vae.py``)."""
    import jax
    import numpy as np

    from ip2p_jax.image_processing import postprocess, to_pil
    from ip2p_jax.random_models import random_vae
    from ip2p_jax.training.autoencoder import AutoencoderSettings, autoencoder_step
    from ip2p_jax.visualisation import grid
    from ip2p_jax.weights import load_vae

    del workdir, main_process
    if config.model == "new":
        vae, params = random_vae(config.new_model.vae.to_dict(), jax.random.key(config.seed))
    else:
        vae, params = load_vae(config.model)
    tx = optimizer(config)
    settings = AutoencoderSettings(
        vae=vae,
        tx=tx,
        kl_weight=config.objective.kl_weight,
        ema_max_decay=config.ema.decay,
        accumulation=config.optim.accumulation,
        learning_rate=config.optim.learning_rate,
    )
    reconstruct = jax.jit(lambda p, x: vae.apply({"params": p}, x))

    def batch(rows):
        return {"images": np.concatenate([rows["input_image"], rows["edited_image"]])}

    def samples(ema, rows):
        """Rows of (picture | reconstruction by the EMA params)."""
        pictures = rows["input_image"]
        pairs = zip(postprocess(pictures), postprocess(reconstruct(ema, pictures)), strict=True)
        return grid([[to_pil(picture), to_pil(reconstruction)] for picture, reconstruction in pairs])

    return Task(params, tx, functools.partial(autoencoder_step, settings=settings), {}, batch, samples)
