"""Training: state and optimizer (``state.py``), the InstructPix2Pix step (``step.py``) and the other tasks' steps
(``text_to_image.py``, ``clip.py``, ``autoencoder.py``) over a shared diffusion objective (``objective.py``), 4 -> 8
channel initialisation (``init.py``), orbax checkpoints (``checkpoint.py``), the tasks ``train.py`` runs
(``tasks/``, chosen by ``config.task``), their held-out evaluators (``evaluators.py``) and process 0's outputs
(``reporting.py``)."""
