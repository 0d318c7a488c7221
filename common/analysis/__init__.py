"""analyze: ranks, spectra and subspaces of τ against Δ, the report and plots, and τ exported as a LoRA."""
