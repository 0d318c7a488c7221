"""An adapter: its config and files, the merge plan, peft's arithmetic, the streaming merge and Δ."""
