"""Files: safetensors read and written in chunks, output folders that appear whole, local folders and hub ids."""
