"""The settings every ``train.py`` run shares, in groups, written once: a config file (``configs/``) starts from
``training_config`` and sets what its task and recipe change (``configs/README.md`` lists them).

Groups, each overridable on the command line (``--config.optim.learning_rate=1e-4``):

  * top level: ``task``, ``model`` (a diffusers folder, hub id, or ``"new"``), ``steps``, ``seed``, ``dtype``,
    ``fsdp``, ``log_every``;
  * ``optim``: AdamW's learning rate and weight decay, gradient clipping, gradient accumulation;
  * ``ema``: the EMA weights' decay;
  * ``checkpoint``: how often to save, how many to keep.

Every config sets ``data`` (what the batches are, ``name``: a TFDS data set or a stream, and how many,
``global_batch_size``; ``edit_data`` for an editing data set) and ``sample`` (pictures of the EMA weights every
``every`` steps, 0: never). Task-specific groups are added by the configs that need them: ``objective`` (the
diffusion loss), ``eval`` (word localisation or retrieval), ``grounding``; and ``new_model``, a random model's
architecture.
"""

from __future__ import annotations

import ml_collections


def training_config(task: str, model: str = "new") -> ml_collections.ConfigDict:
    """The shared settings at the defaults most configs keep; unlocked, for the config file to add its ``data`` and
    ``sample`` groups, extend and lock."""
    config = ml_collections.ConfigDict()
    config.task = task  # "ip2p", "autoencoder", "clip" or "text_to_image"
    config.model = model  # a diffusers folder or hub id to start from, or "new" (config.new_model)
    config.steps = 1000  # optimizer steps
    config.seed = 0
    config.dtype = "float32"  # the compute dtype; params stay float32
    config.fsdp = 1  # devices each parameter is sharded over (1: replicated)
    config.log_every = 50
    config.optim = ml_collections.ConfigDict(
        dict(learning_rate=1e-4, weight_decay=1e-2, max_grad_norm=1.0, accumulation=1)  # accumulation: micro-batches
    )
    config.ema = ml_collections.ConfigDict(dict(decay=0.9999))
    config.checkpoint = ml_collections.ConfigDict(dict(every=500, keep=2))
    return config


def edit_data(
    name: str, resolution: int, resize_max: int, global_batch_size: int, **extra
) -> ml_collections.ConfigDict:
    """The ``data`` group of an editing data set (TFDS ``name``: ``ip2p_original``, ``ip2p_manifest``,
    ``shapes_edit``; or ``synthetic``): resized to a random side in ``[resolution, resize_max]``, cropped to
    ``resolution``, flipped half the time."""
    return ml_collections.ConfigDict(
        dict(
            name=name,
            data_dir="",  # TFDS data_dir ("" = TFDS's default)
            manual_dir="",  # the source folder a TFDS data set is built from the first time
            split="train",
            resolution=resolution,  # the crop
            resize_min=resolution,
            resize_max=resize_max,
            flip_prob=0.5,
            shuffle_buffer=2000,
            global_batch_size=global_batch_size,
            **extra,
        )
    )


def diffusion_objective(**changes) -> ml_collections.ConfigDict:
    """The ``objective`` group (``training/objective.py``); the defaults are the reference's epsilon MSE."""
    return ml_collections.ConfigDict(
        dict(
            prediction_type="",  # "" = the model's own (its scheduler config), or "epsilon" / "v_prediction"
            rescale_betas_zero_snr=False,  # True: zero terminal SNR (Lin et al. 2024); exports trailing spacing
            snr_gamma=0.0,  # Min-SNR-gamma loss weighting (Hang et al. 2023; 5 in the paper); 0 = off
            noise_offset=0.0,  # offset noise scale (e.g. 0.05); 0 = off
        )
        | changes
    )


def unet_kernels(config: ml_collections.ConfigDict) -> None:
    """Adds the UNet's train-step settings: ``remat`` (rematerialised blocks: "none", "transformer",
    "resnet_and_transformer") and ``attention_backend`` (``models/attention_kernels.py``)."""
    config.remat = "none"
    config.attention_backend = "auto"
