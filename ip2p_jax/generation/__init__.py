"""Generating with a text-to-image model: its samplers (``text_to_image``: plain and Prompt-to-Prompt pairs), the
Prompt-to-Prompt control and token alignment (``prompt_to_prompt``), and InstructPix2Pix's data generation (paper
3.1), by concern: caption triples (``triples``), candidate pairs and the CLIP filter (``candidates``), the released
layout (``layout``), and the generator that runs them over the mesh (``pairs``)."""
