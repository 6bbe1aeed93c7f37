"""The first ShapesEdit InstructPix2Pix model (shipped as ``models/shapes-ip2p`` until the miniature lineage of
``configs/shapes_ip2p.py`` replaced it; its figures stay in docs/shapes.md for comparison): a small UNet trained from
scratch with the reference recipe on ShapesEdit's training split, over the autoencoder of ``configs/shapes_vae.py``.
The text encoder is a randomly initialised 2-layer CLIP text transformer, frozen as in IP2P (nothing trains it
here), over a tokenizer that knows ShapesEdit's words.

    python train.py --config configs/shapes_ip2p_scratch.py --config.new_model.vae=runs/shapes-vae/vae \
        --workdir runs/shapes
    python export.py --workdir runs/shapes --out models/shapes-ip2p
"""

import ml_collections

from ip2p_jax.data.shapes import WORDS
from ip2p_jax.training.config import diffusion_objective, edit_data, training_config, unet_kernels


def get_config() -> ml_collections.ConfigDict:
    config = training_config("ip2p")
    config.new_model = dict(
        unet=dict(
            in_channels=8,
            out_channels=4,
            block_out_channels=[48, 96, 96],
            layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=64,
            attention_head_dim=4,  # diffusers' name for the number of heads in SD 1.x configs
            norm_num_groups=16,
            sample_size=16,
        ),
        vae="models/shapes-ip2p/vae",  # a trained autoencoder folder (export.py of a shapes_vae run)
        text_encoder=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        words=list(WORDS),
    )
    config.init_from = "ip2p"
    config.steps = 5000
    config.data = edit_data("shapes_edit", resolution=64, resize_max=72, global_batch_size=32)
    config.optim.learning_rate = 3e-4
    config.objective = diffusion_objective(conditioning_dropout=0.05)
    config.sample = dict(every=1000, count=6, steps=50)  # edits of the first batch's images by the EMA UNet
    unet_kernels(config)
    config.lock()
    return config
