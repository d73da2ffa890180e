"""emclip: scale-aware multiple-instance vision-language contrastive learning for electron microscopy."""

import os

# OpenMP threads that spin-wait for work steal the cores of a shared or busy machine: measured 12x slower cache-mode
# training steps on 2 busy cores (benchmarks/bench_threads.py). Passive waiting costs nothing measurable when idle.
# Only effective when emclip is imported before torch; the Makefile also exports it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
