"""InstructPix2Pix training: state and optimizer (``state.py``), the step (``step.py``), 4 -> 8 channel
initialisation (``init.py``) and orbax checkpoints (``checkpoint.py``)."""
