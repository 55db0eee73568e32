"""What PEFT's LyCORIS-style adapters (LoHa, LoKr) share: PEFT's `lycoris_utils` on the tuner seam.

- config.py: the fields both configs have (r, alpha, rank/module dropout, patterns, use_effective_conv2d).
- bases.py: which base layers they adapt (Linear, Conv1d, Conv2d) and their views (the layer's `view_for`).
- layer.py: per-adapter state, PEFT's init/dtype rules, merge rule, file keys; forward.py: what forward runs.
- model.py: rank/alpha patterns and PEFT's default targets.

A tuner adds only its factors: their shapes, their initialisation and how they make the delta weight ΔW.
"""
