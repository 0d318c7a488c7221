"""τ = finetuned − base: extracted from two checkpoints into a file, or read from two models on the fly."""
