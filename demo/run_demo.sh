#!/usr/bin/env bash
# The README's four steps on a tiny StarCoder2 and a LoRA adapter trained for 5 steps, at fp32 and fp16.
# Shows the seed's finding in miniature: at fp32 only the LoRA targets change and they match the LoRA
# delta; at fp16 every tensor changes, and the extra ones are rounding artifacts. compare also runs the merged model
# against base + adapter unmerged (--check_logits).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-demo_output}
export HF_HUB_OFFLINE=1

run() {
    echo
    echo "\$ ${*#"$PY "}"
    "$@"
}

rm -rf "$OUT"
echo "== building a tiny StarCoder2 base model and a LoRA adapter (offline) =="
$PY -m demo.tiny_models --out "$OUT" >/dev/null
ls "$OUT/base_model" "$OUT/checkpoint-5"

for precision in fp32 fp16; do
    echo
    echo "== the four steps at $precision =="
    run $PY merge_lora.py --base_model "$OUT/base_model" --lora_path "$OUT/checkpoint-5" \
        --output_dir "$OUT/merged_model_$precision" --precision "$precision"
    run $PY extract_task_vectors.py --base_model "$OUT/base_model" --finetuned_model "$OUT/merged_model_$precision" \
        --output_dir "$OUT/task_vectors_$precision"
    status=0
    run $PY compare_lora_task_vector.py --base_model "$OUT/base_model" --lora_path "$OUT/checkpoint-5" \
        --task_vector_path "$OUT/task_vectors_$precision/task_vector.safetensors" \
        --output_dir "$OUT/comparison_results_$precision" --tolerance 1e-5 --check_logits || status=$?
    echo "(exit code $status)"
    expected=$([ "$precision" = fp32 ] && echo 0 || echo 1)
    if [ "$status" != "$expected" ]; then
        echo "demo: expected compare to exit $expected at $precision, got $status" >&2
        exit 1
    fi
    run $PY analyze_lora_vs_task_vector_math.py \
        --lora_file "$OUT/comparison_results_$precision/lora_deltas.safetensors" \
        --task_vector_file "$OUT/task_vectors_$precision/task_vector.safetensors" \
        --output_dir "$OUT/mathematical_analysis_$precision"
done

echo
echo "== QLoRA: the adapter merged into the nf4 double-quantized 4-bit base, and compare's verdict =="
run $PY merge_lora.py --base_model "$OUT/base_model" --lora_path "$OUT/checkpoint-5" --output_dir "$OUT/merged_qlora" \
    --precision bf16 --bnb_4bit_quant_type nf4 --bnb_4bit_use_double_quant
run $PY extract_task_vectors.py --base_model "$OUT/base_model" --finetuned_model "$OUT/merged_qlora" \
    --output_dir "$OUT/task_vectors_qlora"
status=0
run $PY compare_lora_task_vector.py --base_model "$OUT/base_model" --lora_path "$OUT/checkpoint-5" \
    --task_vector_path "$OUT/task_vectors_qlora/task_vector.safetensors" \
    --output_dir "$OUT/comparison_results_qlora" || status=$?
if [ "$status" != 1 ]; then
    echo "demo: expected compare to exit 1 (a QLoRA merge is not τ = Δ), got $status" >&2
    exit 1
fi

echo
echo "== done: reports and plots are in $OUT/ =="
