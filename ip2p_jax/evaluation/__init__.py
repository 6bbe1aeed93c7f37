"""Measuring edits and models: ShapesEdit's judging against exact ground truth (``shapes_edit``), word
localisation of cross-attention (``localisation``), CLIP's scores of the papers (``clip_metrics``) and the CLIP
trade-off curve over guidance scales (``clip_tradeoff``)."""
