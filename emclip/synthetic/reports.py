"""Free-text renal EM reports written from a patient's sampled scene.

Reports read like real ones: a findings paragraph with noisy measurements, negated findings, varied wording and
order, then a diagnosis line that is sometimes hedged. Measurements are physical (size twins are scaled), so the
text side carries the size information that a single image without its scale does not.
"""
from __future__ import annotations

import numpy as np

from .specs import PatientScene, load_specs

HEADERS = ["ELECTRON MICROSCOPY:", "Electron microscopy:", "ULTRASTRUCTURAL FINDINGS:", "EM findings:",
           "Ultrastructural examination:"]
DIAGNOSIS_HEADERS = ["DIAGNOSIS:", "Diagnosis:", "Final diagnosis:", "IMPRESSION:", "Interpretation:"]
HEDGES = ["{}", "{}", "{}", "Findings consistent with {}", "Features suggestive of {}", "In keeping with {}",
          "Most consistent with {}", "Ultrastructural features favour {}"]
PROPER_NOUNS = ("Alport", "IgA")
COUNTS = ["One", "Two", "Three", "Four", "Five"]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _round(x: float, step: int = 10) -> int:
    return int(step * round(x / step))


def _gbm_sentence(scene: PatientScene, rng) -> str:
    p = scene.params
    mean = scene.physical("gbm_thickness_nm") * rng.normal(1.0, 0.05)   # a pathologist's noisy measurement
    spread = mean * (0.15 + p["gbm_irregularity"])
    lo, hi = max(mean - 1.5 * spread, 60), mean + 1.5 * spread
    m, lo, hi = _round(mean), _round(lo), _round(hi)
    if p["lamellation"]:
        return _pick(rng, [
            f"Glomerular basement membranes show irregular thinning and thickening ({lo} to {hi} nm) with "
            f"splitting and lamellation of the lamina densa, imparting a basket-weave appearance.",
            f"The GBM is irregular, alternating thin ({lo} nm) and thick ({hi} nm) segments, with a multilayered, "
            f"basket-weave lamina densa.",
        ])
    quality = "normal" if 280 <= mean <= 430 else ("thin" if mean < 280 else "thickened")
    return _pick(rng, [
        f"Glomerular basement membranes measure {m} nm on average (range {lo}-{hi} nm).",
        f"The GBM thickness averages {m} nm.",
        f"Capillary basement membranes are {'diffusely ' if quality != 'normal' else ''}{quality}, "
        f"with a mean thickness of {m} nm.",
        f"Basement membrane measurements: mean {m} nm, range {lo} to {hi} nm; these are {quality}.",
    ])


def _podocyte_sentence(scene: PatientScene, rng) -> str:
    eff = scene.params["effacement"]
    pct = _round(eff * 100 * rng.normal(1.0, 0.08), 5)
    if eff < 0.12:
        return _pick(rng, ["Podocyte foot processes are preserved.", "Foot processes are largely intact.",
                           "There is no significant foot process effacement."])
    if eff > 0.75:
        return _pick(rng, [f"There is diffuse effacement of podocyte foot processes (approximately {min(pct, 100)}%).",
                           f"Foot processes are extensively effaced, involving about {min(pct, 100)}% of the "
                           f"capillary surface, with microvillous transformation.",
                           "Podocytes show diffuse foot process effacement."])
    return _pick(rng, [f"Foot process effacement is segmental, involving about {pct}% of capillary surfaces.",
                       f"There is partial effacement of podocyte foot processes (~{pct}%).",
                       f"Foot processes are focally effaced ({pct}%)."])


def _deposit_sentences(scene: PatientScene, rng) -> list[str]:
    deps = scene.params["deposits"]
    if not deps:
        return [_pick(rng, ["No electron-dense deposits are identified.", "There are no immune-type deposits.",
                            "Electron-dense deposits are not seen.", "No immune complex-type deposits are present."])]
    out = []
    for dep in deps:
        site = dep["site"]
        if site == "subepithelial":
            out.append(_pick(rng, ["Numerous subepithelial electron-dense deposits are present, with intervening "
                                   "basement membrane spikes.",
                                   "Subepithelial deposits are seen along most capillary loops, separated by GBM "
                                   "spikes.",
                                   "There are regularly spaced subepithelial immune-type deposits with spike "
                                   "formation."]))
        elif site == "subendothelial":
            out.append(_pick(rng, ["Subendothelial electron-dense deposits are identified.",
                                   "There are scattered subendothelial immune-type deposits.",
                                   "Deposits are present in subendothelial locations."]))
        else:
            out.append(_pick(rng, ["Mesangial and paramesangial electron-dense deposits are present.",
                                   "The mesangium contains electron-dense deposits.",
                                   "Scattered mesangial immune-type deposits are seen."]))
    return out


def _fibril_sentence(scene: PatientScene, rng) -> str | None:
    fib = scene.params["fibrils"]
    if not fib:
        return _pick(rng, ["No fibrillary deposits are seen.", "Fibrils are not identified.", None, None])
    d = fib["diameter_nm"] * scene.size_ratio   # physical diameter: size twins have scaled fibrils
    lo, hi = int(round(d * rng.uniform(0.8, 0.95))), int(round(d * rng.uniform(1.05, 1.25)))
    return _pick(rng, [f"Randomly oriented, non-branching fibrils measuring {lo}-{hi} nm in diameter expand the "
                       f"mesangium and infiltrate the GBM.",
                       f"The mesangium contains haphazardly arranged fibrils {lo} to {hi} nm thick.",
                       f"Non-branching fibrils of {lo}-{hi} nm diameter are present in mesangial areas and "
                       f"capillary walls."])


def _extra_sentences(scene: PatientScene, rng) -> list[str]:
    p = scene.params
    out = []
    if p["tubuloreticular"]:
        out.append(_pick(rng, ["Tubuloreticular inclusions are present in glomerular endothelial cells.",
                               "Endothelial tubuloreticular inclusions are identified."]))
    elif rng.random() < 0.4:
        out.append(_pick(rng, ["No tubuloreticular inclusions are seen.",
                               "Tubuloreticular inclusions are not identified."]))
    if p.get("mesangial_nodules"):
        out.append(_pick(rng, ["The mesangium is expanded by increased matrix with nodule formation.",
                               "There is nodular mesangial sclerosis."]))
    elif rng.random() < 0.3:
        out.append("The mesangium is not expanded.")
    if rng.random() < 0.5:
        out.append(_pick(rng, ["Endothelial cells are unremarkable.", "Capillary lumina are patent.",
                               "No endocapillary hypercellularity is seen."]))
    return out


def write_report(scene: PatientScene, rng: np.random.Generator) -> str:
    """One report: header, shuffled findings, and a (sometimes hedged) diagnosis line."""
    n_glom = _pick(rng, COUNTS)
    opening = _pick(rng, [f"{n_glom} glomeruli are examined.", f"{n_glom} glomeruli are present for evaluation.",
                          f"The sample contains {n_glom.lower()} glomeruli."]).replace("One glomeruli are",
                                                                                           "One glomerulus is")
    findings = [_gbm_sentence(scene, rng), _podocyte_sentence(scene, rng), *_deposit_sentences(scene, rng),
                *_extra_sentences(scene, rng)]
    fibrils = _fibril_sentence(scene, rng)
    if fibrils:
        findings.append(fibrils)
    order = rng.permutation(len(findings))
    body = " ".join([opening] + [findings[i] for i in order])
    name = _pick(rng, scene.names_in_reports or load_specs()[scene.diagnosis].names_in_reports)
    hedge = _pick(rng, HEDGES)
    if hedge != "{}" and not name.split()[0].startswith(PROPER_NOUNS):
        name = name[0].lower() + name[1:]
    line = hedge.format(name)
    return f"{_pick(rng, HEADERS)} {body}\n{_pick(rng, DIAGNOSIS_HEADERS)} {line}."
