"""The ``demo`` built-in model's world: generated scenes of simple shapes, and how the model was trained on them.

:mod:`sdgate.demo.scenes` draws captioned scenes (deterministic from a seed, unlimited, no download);
:mod:`sdgate.demo.train` trains a small Stable Diffusion pipeline on them (``sdgate train-demo``).
"""
