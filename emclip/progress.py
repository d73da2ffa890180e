"""Whether progress bars show: ``TQDM_DISABLE`` (set by the report runner) is honoured everywhere.

tqdm reads ``TQDM_DISABLE`` only when ``disable`` is not passed, and its notebook bar (what ``tqdm.auto`` picks in
a kernel) always passes it, so a report would show a frozen "0%|" bar and lose the lines written instead of it."""
from __future__ import annotations

import os


def bars_disabled() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")
