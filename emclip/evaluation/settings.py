"""The evaluation protocol's settings (a parameter set's ``evaluation:`` section): one place for their defaults."""
from __future__ import annotations

from dataclasses import dataclass, fields

SPLITS = ("test", "val", "train")
# the split name an external cohort's patients get in an evaluation: all of them are scored, whatever their own split
EXTERNAL_SPLIT = "external"


@dataclass(frozen=True)
class EvaluationConfig:
    split: str = "test"       # which patients are scored (val while choosing, test to report)
    bootstrap: int = 1000     # resamples of the test patients behind every confidence interval
    top_j: int = 3            # MI-Zero pooling: each patient's top-1 and top-j image scores are also reported

    def __post_init__(self):
        problems = []
        if self.split not in SPLITS:
            problems.append(f"split={self.split!r} is not one of {', '.join(SPLITS)}")
        for name in ("bootstrap", "top_j"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if problems:
            raise ValueError("invalid evaluation settings: " + "; ".join(problems))

    @property
    def topj(self) -> tuple[int, ...]:
        """The j of top-j pooling that are reported: 1 and ``top_j``."""
        return tuple(sorted({1, self.top_j}))

    @classmethod
    def from_section(cls, section: dict | None, where: str = "evaluation") -> "EvaluationConfig":
        return from_section(cls, section, where)


def from_section(cls, section: dict | None, where: str):
    """A settings dataclass from a parameter set's section, refusing a key it does not know (with the known ones)."""
    section = dict(section or {})
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**section)


DEFAULT_EVALUATION = EvaluationConfig()
