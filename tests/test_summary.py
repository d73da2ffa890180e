"""summary.label_sentence: where the evaluated patients' diagnoses came from and who was left out, in one sentence."""
from emclip.summary import label_sentence


def _metrics(given=0, by_labeler=0, none=0, outside=0, **labels):
    return {"n_patients": given + by_labeler + none + outside, "split": "test",
            "labels": {"sources": {"given": given + outside, "labeler": by_labeler, "none": none},
                       "n_no_diagnosis": none, "n_diagnosis_not_in_classes": outside, **labels}}


def test_given_diagnoses_only():
    assert label_sentence(_metrics(given=20)) == "**Diagnoses** of the 20 test patients: 20 given."


def test_labeler_diagnoses_name_the_labeler_and_the_hedge_policy():
    text = label_sentence(_metrics(given=5, by_labeler=7, labeler="report labeler (renal)", uncertain="exclude"))
    assert text == ("**Diagnoses** of the 12 test patients: 5 given, 7 labeler (from the report labeler (renal); "
                    "hedged diagnoses excluded).")
    assert "hedged diagnoses counted" in label_sentence(_metrics(by_labeler=3, uncertain="positive"))
    assert "(from the report labeler;" in label_sentence(_metrics(by_labeler=3))        # labeler name not recorded


def test_excluded_patients_are_counted_by_reason():
    text = label_sentence(_metrics(given=8, none=2, outside=1))
    assert text.startswith("**Diagnoses** of the 11 test patients: 9 given. 3 patient(s) are excluded")
    assert "2 without a usable diagnosis, 1 with a diagnosis outside the classes." in text


def test_no_diagnosis_at_all_and_all_splits():
    m = _metrics(none=4)
    m["split"] = None
    assert label_sentence(m).startswith("**Diagnoses** of the 4 all patients: none. 4 patient(s) are excluded")


def test_metrics_without_label_provenance():
    assert "not recorded" in label_sentence({"n_patients": 3})
