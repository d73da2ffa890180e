"""Serving a trained model: the self-contained exported model folder (``modelfolder``) and the on-disk embedding
index that ``python -m emclip.embed`` writes and ``python -m emclip.search`` reads (``index``). The public face is
``emclip.api``."""
