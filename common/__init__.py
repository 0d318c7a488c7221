"""The toolkit's code, in layers; each imports only from the layers below it (docs/development.md):

analysis/   analyze: the measures, their report and plots, τ exported as a LoRA
compare/    compare: the comparison, the diagnosis of a mismatch, the logits check, the report
lora/       an adapter: its config and files, the merge plan, peft's arithmetic, the streaming merge, Δ
taskvec/    τ: extracted from two checkpoints, or read from two models
model/      a model's layout, classes, module kinds and 4-bit quantization
numerics/   precision, rounding bounds, norms and cosines, spectra, NaN and Inf
io/         safetensors read and written in chunks, output folders, local folders and hub ids
errors.py, quiet.py, cli.py: the user-error type, quieter libraries, the scripts' command line and exit codes
"""
