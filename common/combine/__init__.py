"""Several adapters and task vectors combined into one model, θ₀ + Σ wᵢ·Δᵢ, streamed tensor by tensor (docs/combine.md).

`plan.py` joins the inputs on the base's tensors (which tensor gets which input's term, and what may not be
combined); `combine.py` writes each output tensor with peft's rounding or with one rounding of the float64 sum;
`rounding.py` rounds float64 to fp16 and bf16 once; `record.py` writes combination.json beside the weights.
"""
