"""compare: τ checked against Δ, the diagnosis of a mismatch, the logits check and the report."""
