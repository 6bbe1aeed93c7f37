"""The miniature lineage's CLIP (``models/shapes-clip``): a small CLIP trained contrastively from scratch on the
endless stream of captioned ShapesEdit scenes (every shape-colour combination). Its text tower is the frozen text
encoder of the lineage's text-to-image and InstructPix2Pix models; the whole CLIP is ShapesEdit's CLIP metric model.

    python train.py --config configs/shapes_clip.py --workdir runs/shapes-clip
    python export.py --workdir runs/shapes-clip --out models/shapes-clip
"""

import ml_collections

from ip2p_jax.data.shapes import WORDS


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "clip"
    config.model = "new"
    config.new_model = dict(
        clip=dict(
            text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
            vision=dict(
                hidden_size=128,
                intermediate_size=512,
                num_hidden_layers=4,
                num_attention_heads=4,
                image_size=64,
                patch_size=8,
            ),
            projection_dim=64,
            words=list(WORDS),
        )
    )
    config.data = "shapes_captions"
    config.resolution = 64
    config.global_batch_size = 128
    config.accumulation = 1
    config.steps = 2000
    config.learning_rate = 5e-4
    config.weight_decay = 0.1
    config.max_grad_norm = 1.0
    config.ema_decay = 0.999
    config.fsdp = 1
    config.seed = 0
    config.log_every = 50
    config.save_every = 500
    config.keep_checkpoints = 2
    config.sample_every = 250  # held-out retrieval of the EMA weights (0: never)
    config.sample_count = 0
    config.eval_count = 100  # held-out scenes for retrieval
    config.dtype = "float32"
    config.lock()
    return config
