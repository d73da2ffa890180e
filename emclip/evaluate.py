"""Short import path for the evaluation protocol (``from emclip.evaluate import evaluate, embed_cohort``).

The code lives in the :mod:`emclip.evaluation` subpackage, one small module per task.
"""
from emclip.evaluation import *  # noqa: F401,F403
from emclip.evaluation import __all__  # noqa: F401
