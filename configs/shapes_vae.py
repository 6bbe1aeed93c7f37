"""The autoencoder of the ShapesEdit model (``models/shapes-ip2p/vae``): a small ``AutoencoderKL`` with 4x
downsampling (64 x 64 pictures -> 16 x 16 x 4 latents) trained from scratch on both pictures of ShapesEdit's
training pairs.

    python train.py --config configs/shapes_vae.py --workdir runs/shapes-vae
    python export.py --workdir runs/shapes-vae --out runs/shapes-vae/vae
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "autoencoder"
    config.model = "new"
    config.new_model = dict(
        vae=dict(
            block_out_channels=[16, 32, 64],
            down_block_types=["DownEncoderBlock2D"] * 3,
            up_block_types=["UpDecoderBlock2D"] * 3,
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            sample_size=64,
        )
    )
    config.kl_weight = 1e-5  # against the mean L1 error (Stable Diffusion's autoencoder: 1e-6 against a sum)
    config.data = "shapes_edit"
    config.data_dir = ""  # TFDS data_dir ("" = TFDS's default)
    config.manual_dir = ""
    config.split = "train"
    config.resolution = 64  # no resizing or cropping: the autoencoder sees the pictures as they are
    config.resize_min = 64
    config.resize_max = 64
    config.flip_prob = 0.5
    config.shuffle_buffer = 2000
    config.global_batch_size = 12  # pairs: 24 pictures a step
    config.accumulation = 1
    config.steps = 4500
    config.learning_rate = 4e-4
    config.weight_decay = 0.0
    config.max_grad_norm = 1.0
    config.ema_decay = 0.999
    config.fsdp = 1
    config.seed = 0
    config.log_every = 50
    config.save_every = 500
    config.keep_checkpoints = 2
    config.sample_every = 500  # reconstructions of the first batch's input pictures (0: never)
    config.sample_count = 8
    config.dtype = "float32"
    config.lock()
    return config
