"""``evaluate.py``'s settings: the data, the methods, the sampler's and FoI's.

    python evaluate.py --config.data.limit=100 --config.sample.steps=50 --out runs/evaluation
    python evaluate.py --config.data.splits=test_single --config.methods=foi --config.foi.outside_values=image_only

Unset FoI settings take the model folder's ``foi_config.json``, else the paper's (``FoIConfig.for_model``); the
FoI methods all use them (the ablations with their switch off).
"""

import ml_collections
from ml_collections import config_dict

from ip2p_jax.foi import foi_settings
from ip2p_jax.script_config import sampling_settings


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(
        dict(
            dataset="shapes_edit",  # TFDS name (and config), e.g. shapes_edit/small
            data_dir="",  # TFDS data_dir ("" = TFDS's default)
            # comma-separated; "" = both test splits (evaluate.DEFAULT_SPLITS); "train_fit": the fit check, the
            # training split's non-leaky examples
            splits="",
            limit=config_dict.placeholder(int),  # examples per split; unset = all
        )
    )
    # comma-separated; "" = every method (evaluate.METHODS); the references "ground_truth" and "input" on request
    config.methods = ""
    config.sample = sampling_settings(batch=25)  # batch: images per sampler call
    config.foi = foi_settings()
    config.lock()
    return config
