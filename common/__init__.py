"""Shared code of the four scripts: streaming I/O, adapters, precision, metrics, reports.

Importing it asks torch to back its CPU tensors of 2 MB and more with transparent huge pages
(`THP_MEM_ALLOC_ENABLE`, read at torch's first such allocation; an explicit value in the environment wins).
Every tensor the scripts hold is allocated fresh and handed back, and on 4 KB pages the page faults of
that dominate the element-wise work: measured on this project's CPU machine, converting a 3072 × 3072
fp32 tensor to float64 takes 3–6× less time with it (docs/streaming.md).
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
