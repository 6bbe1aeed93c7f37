"""The autoencoder of the ShapesEdit model (``models/shapes-ip2p/vae``): a small ``AutoencoderKL`` with 4x
downsampling (64 x 64 pictures -> 16 x 16 x 4 latents) trained from scratch on both pictures of ShapesEdit's
training pairs.

    python train.py --config configs/shapes_vae.py --workdir runs/shapes-vae
    python export.py --workdir runs/shapes-vae --out runs/shapes-vae/vae
"""

import ml_collections

from ip2p_jax.training.config import edit_data, training_config


def get_config() -> ml_collections.ConfigDict:
    config = training_config("autoencoder")
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
    config.steps = 4500
    # No resizing or cropping: the autoencoder sees the pictures as they are. Pairs: 24 pictures a step.
    config.data = edit_data("shapes_edit", resolution=64, resize_max=64, global_batch_size=12)
    config.optim.learning_rate = 4e-4
    config.optim.weight_decay = 0.0
    config.ema.decay = 0.999
    config.objective = dict(kl_weight=1e-5)  # against the mean L1 error (Stable Diffusion's: 1e-6 against a sum)
    config.sample = dict(every=500, count=8)  # reconstructions of the first batch's input pictures (0: never)
    config.lock()
    return config
