"""InstructPix2Pix and Focus on Your Instruction in JAX/Flax."""

import importlib.util
import os

# The library reads transformers' tokenizer and nothing of its PyTorch models: without PyTorch (the plain
# ``pip install -e .``), transformers' advice that its models are unavailable is noise on every run.
if importlib.util.find_spec("torch") is None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
