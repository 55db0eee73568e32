"""What the ops share: settings (read once), the dispatch rule, tiling, the strided LoRA matmul, the custom-op
factory, mixed-batch metadata and Triton device functions. Op files import from here and from each other's
public names only."""
