"""Disease specifications (data in ``diseases.yaml``) and per-patient sampling of scene parameters."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

SPEC_FILE = Path(__file__).with_name("diseases.yaml")


@dataclass(frozen=True)
class DiseaseSpec:
    name: str
    prevalence: float
    scene: dict                    # scene parameters of the rendered (base) scene, ranges not yet sampled
    render_as: str                 # name of the disease whose scene is rendered (itself unless a size twin)
    size_ratio: float = 1.0        # physical lengths of this disease = rendered scene lengths x size_ratio
    report_names: tuple[str, ...] = ()   # how a report names it (diseases.yaml); empty: the name itself

    @property
    def names_in_reports(self) -> list[str]:
        return list(self.report_names) or [self.name[0].upper() + self.name[1:]]


@dataclass
class PatientScene:
    """Sampled parameters of one patient, in nanometres of the *rendered* scene (multiply by ``size_ratio``)."""
    diagnosis: str
    size_ratio: float
    params: dict = field(default_factory=dict)
    names_in_reports: list[str] = field(default_factory=list)   # from the spec: how its report names the disease

    def physical(self, key: str) -> float:
        """A length parameter in true physical nanometres (what a pathologist would measure)."""
        return float(self.params[key]) * self.size_ratio


@lru_cache(maxsize=4)
def load_specs(path: str | Path = SPEC_FILE) -> dict[str, DiseaseSpec]:
    raw = yaml.safe_load(Path(path).read_text())
    defaults = raw["scene_defaults"]
    specs: dict[str, DiseaseSpec] = {}
    for name, entry in raw["diseases"].items():
        entry = dict(entry or {})
        prevalence = float(entry.pop("prevalence", 1.0))
        twin = entry.pop("twin_of", None)
        ratio = float(entry.pop("size_ratio", 1.0))
        names = tuple(str(n) for n in entry.pop("report_names", None) or ())
        if twin is not None:
            if twin not in raw["diseases"] or raw["diseases"][twin].get("twin_of"):
                raise ValueError(f"{path}: disease {name!r} is a twin of {twin!r}, which is missing or itself a twin")
            if entry:
                raise ValueError(f"{path}: size twin {name!r} may not set scene parameters: {sorted(entry)}")
            scene = {**copy.deepcopy(defaults), **copy.deepcopy(raw["diseases"][twin] or {})}
            scene.pop("prevalence", None)
            scene.pop("report_names", None)
            specs[name] = DiseaseSpec(name, prevalence, scene, render_as=twin, size_ratio=ratio, report_names=names)
        else:
            specs[name] = DiseaseSpec(name, prevalence, {**copy.deepcopy(defaults), **entry}, render_as=name,
                                      report_names=names)
    return specs


def diagnoses(path: str | Path = SPEC_FILE) -> list[str]:
    """The diagnosis names of the embedded cohort, in specification order."""
    return list(load_specs(path))


def confusable_pairs(path: str | Path = SPEC_FILE) -> list[tuple[str, str, float]]:
    """(disease, twin, size_ratio) for every pair that differs only in physical size."""
    return [(s.name, s.render_as, s.size_ratio) for s in load_specs(path).values() if s.render_as != s.name]


def _draw(value, rng: np.random.Generator):
    """A [lo, hi] pair is a uniform range; anything else is a constant."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(rng.uniform(value[0], value[1]))
    return value


def sample_patient(spec: DiseaseSpec, rng: np.random.Generator) -> PatientScene:
    """Draw one patient's scene parameters; list-valued entries such as deposits are drawn per item."""
    params: dict = {}
    for key in sorted(spec.scene):  # sorted: the draw order must not depend on YAML key order
        value = spec.scene[key]
        if key == "deposits":
            params[key] = [{k: _draw(v, rng) for k, v in sorted(dep.items())} for dep in value]
        elif key == "fibrils" and value:
            params[key] = {k: _draw(v, rng) for k, v in sorted(value.items())}
        else:
            params[key] = _draw(value, rng)
    return PatientScene(spec.name, spec.size_ratio, params, spec.names_in_reports)
