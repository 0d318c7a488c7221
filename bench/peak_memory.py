"""Run a script as `python SCRIPT ARGS…` would, then print its peak host and GPU memory on stderr's last line.

    python bench/peak_memory.py merge_lora.py --base_model … --device cuda:0

The last line of stderr is `PEAK {"peak_rss_gb": …, "peak_gpu_allocated_gb": …, "peak_gpu_reserved_gb": …}`:
the process's peak resident set (getrusage, what /usr/bin/time's %M reads) and, when the script used CUDA,
torch's peak allocated and reserved device memory. The exit code is the script's.
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
from pathlib import Path


def peaks() -> dict[str, float]:
    found = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        found["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        found["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 3)
    return found


def main() -> None:
    script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    code: object = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    finally:
        print("PEAK " + json.dumps(peaks()), file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
