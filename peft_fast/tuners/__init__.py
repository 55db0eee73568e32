"""Adapter types (tuners) and what they share.

- registry.py: peft_type -> (config, model, layer classes).
- base_layer.py / base_model.py: what every adapter layer / adapted model does (activation, deletion, files, merge
  bookkeeping, launch plans, all-or-nothing changes); a tuner writes its config, its layer math and its merge rule.
- injection.py, targets.py, modules_to_save.py, state_dict.py, merging.py: the shared machinery.
- trainable_tokens.py, token_targets.py: `trainable_token_indices` (embedding rows trained beside an adapter).
- lora/: LoRA and its DoRA variant.
"""
