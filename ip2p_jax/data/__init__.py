"""Training data: a synthetic stream for smoke runs (``synthetic.py``)."""
