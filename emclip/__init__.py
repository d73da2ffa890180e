"""emclip: scale-aware multiple-instance vision-language contrastive learning for electron microscopy.

The public API (``emclip/api.py``)::

    model, transform, tokenizer = emclip.create_model_and_transforms("efficientnet_lite0_minilm")
    trained = emclip.load("runs/demo/mlp-mean-aware-s0")     # a run folder or an exported model folder
    trained.predict("my_cohort"); trained.embed("my_cohort"); trained.search("my_index", text="...")
"""

import os

# OpenMP threads that spin-wait for work steal the cores of a shared or busy machine: measured 12x slower cache-mode
# training steps on 2 busy cores (benchmarks/bench_threads.py). Passive waiting costs nothing measurable when idle.
# Only effective when emclip is imported before torch; the Makefile also exports it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_API = ("create_model_and_transforms", "get_tokenizer", "load", "TrainedModel", "ScaleRangeWarning")
__all__ = ["__version__", *_API]


def __getattr__(name):
    # the API imports torch and open_clip: loaded on first use, so `import emclip` (and its small commands) stay fast
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'emclip' has no attribute {name!r}")
