"""Premises the experiment rests on, each tested so that breaking it fails (issue 14: tests that cannot fail).

* The confusable pairs of the embedded cohort differ only by physical scale: a size twin at s nm/px is pixel for
  pixel its partner at s / size_ratio, and not its partner at s.
* Image -> image retrieval never counts the query patient's own images (they would be trivially near)."""
from __future__ import annotations

import numpy as np
import pytest

from emclip.evaluation import Embeddings
from emclip.evaluation.retrieval import image_image_retrieval, patient_report_retrieval
from emclip.synthetic.cohort import render_image
from emclip.synthetic.specs import load_specs, sample_patient


def _twins():
    specs = load_specs()
    return [(spec, specs[spec.render_as]) for spec in specs.values() if spec.render_as != spec.name]


def test_the_embedded_cohort_has_size_twins():
    assert {(t.name, p.name) for t, p in _twins()} == {("thin basement membrane nephropathy", "normal"),
                                                       ("fibrillary glomerulonephritis", "amyloidosis")}
    assert all(t.size_ratio != 1.0 for t, _ in _twins())


@pytest.mark.parametrize("twin, partner", _twins(), ids=lambda s: s.name)
def test_a_size_twin_is_its_partner_at_another_scale_only(twin, partner):
    scene = sample_patient(twin, np.random.default_rng(7))
    scale, size = 8.0, 64

    def render(spec, nm):   # the same noise stream for every rendering
        return render_image(spec, scene, nm, size, np.random.default_rng(11))

    as_twin = render(twin, scale)
    assert np.array_equal(as_twin, render(partner, scale / twin.size_ratio))   # same pixels at the scaled scale
    assert np.abs(as_twin - render(partner, scale)).mean() > 0.01               # and not at the same scale


def test_image_retrieval_excludes_the_query_patients_own_images():
    # Patient A (dx x) has two identical images; B (dx y) sits next to them, C (dx x) further away. With A's own
    # second image excluded, C is the 2nd neighbour of A's first image; counting it would push C to 3rd.
    a, b, c = np.array([1.0, 0.0]), np.array([0.9, 0.436]), np.array([0.0, 1.0])
    image = np.stack([a, a, b, c]).astype(np.float32)
    emb = Embeddings(patient_ids=["A", "B", "C"], split=["test"] * 3, diagnosis=np.array(["x", "y", "x"], object),
                     patient=np.eye(3, 2, dtype=np.float32), report=np.eye(3, 2, dtype=np.float32), image=image,
                     image_patient=np.array([0, 0, 1, 2]), image_paths=[f"i{k}.tif" for k in range(4)],
                     image_scales=np.ones(4), image_attention=np.full(4, np.nan))
    result = image_image_retrieval(emb)
    by_query = dict(zip(result.query_index.tolist(), result.ranks.tolist()))
    assert by_query[0] == 2 and by_query[1] == 2     # C ranked after B only; A's own image is not in the gallery


def test_patient_to_report_and_report_to_patient_are_the_two_directions():
    # scores[i, j] = patient i . report j; report 0 is a hub close to every patient. Patients 1 and 2 then find the
    # hub before their own report (rank 2), while every report still finds its own patient first (rank 1).
    scores = np.array([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [0.9, 0.0, 0.5]], dtype=np.float32)
    emb = Embeddings(patient_ids=["A", "B", "C"], split=["test"] * 3, diagnosis=np.array(["x", "y", "z"], object),
                     patient=np.eye(3, dtype=np.float32), report=scores.T.copy(), image=np.eye(3, dtype=np.float32),
                     image_patient=np.arange(3), image_paths=[f"i{k}.tif" for k in range(3)],
                     image_scales=np.ones(3), image_attention=np.full(3, np.nan))
    ranks = {r.name: r.ranks.tolist() for r in patient_report_retrieval(emb)}
    assert ranks == {"report_to_patient": [1, 1, 1], "patient_to_report": [1, 2, 2]}


def test_evaluation_runs_on_the_accelerator_when_one_is_present(monkeypatch):
    import torch
    from emclip.evaluation.embeddings import default_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


def test_a_disease_added_to_the_specification_is_named_in_its_reports(tmp_path):
    """Report names live in diseases.yaml with the disease (they were a code table: a new disease raised KeyError)."""
    import yaml
    from emclip.synthetic.reports import write_report
    from emclip.synthetic.specs import SPEC_FILE
    raw = yaml.safe_load(SPEC_FILE.read_text())
    raw["diseases"]["oncocytic glomerulopathy"] = {"prevalence": 1.0, "gbm_thickness_nm": [500, 600]}
    raw["diseases"]["collagenofibrotic glomerulopathy"] = {"prevalence": 1.0, "report_names": ["Collagen III GN"]}
    path = tmp_path / "diseases.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    specs = load_specs(path)
    for name, shown in (("oncocytic glomerulopathy", "Oncocytic glomerulopathy"),
                        ("collagenofibrotic glomerulopathy", "Collagen III GN")):
        report = write_report(sample_patient(specs[name], np.random.default_rng(1)), np.random.default_rng(2))
        assert shown.lower() in report.lower(), report
    assert "report_names" not in specs["thin basement membrane nephropathy"].scene   # a twin copies no names
    assert specs["thin basement membrane nephropathy"].names_in_reports[0] == "Thin basement membrane nephropathy"


def test_the_generator_prompts_and_labeler_name_the_same_diseases():
    """Diagnosis names live in three data files with three jobs (generator, zero-shot prompts, report labeler):
    every disease the embedded cohort has must be a prompt class and a labeler label, spelt the same."""
    from emclip.evaluation import load_prompts
    from emclip.labels.vocab import load_vocab
    generated = set(load_specs())
    assert generated == set(load_prompts("renal_em").classes)
    assert generated <= set(load_vocab("renal").labels)
