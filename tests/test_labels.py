"""Tests of the report labeler (emclip.labels): scope of negation and uncertainty, synonyms, hierarchy, CheXpert's
rules, primary diagnosis, the CLI, hand-written reports the generator never produced, and the embedded cohort."""

from __future__ import annotations

import inspect

import pandas as pd
import pytest

from emclip.labels import Labeler, VocabError, agreement, load_vocab
from emclip.labels.__main__ import main as labels_main


def values(labeler: Labeler, text: str) -> dict:
    return labeler.label(text).values


# ---------------------------------------------------------------------------------------------- negation / uncertainty
@pytest.mark.parametrize("text, expected", [
    ("No deposits but thin GBM.", {"electron-dense deposits": 0, "thin glomerular basement membrane": 1}),
    ("Cannot exclude amyloid.", {"amyloidosis": -1}),
    ("Amyloidosis cannot be entirely excluded.", {"amyloidosis": -1}),
    ("Deposits are not identified.", {"electron-dense deposits": 0}),
    ("Mesangial deposits are not seen, although subendothelial deposits are present.",
     {"mesangial deposits": 0, "subendothelial deposits": 1}),
    ("The GBM is thin, and deposits are not identified.",
     {"thin glomerular basement membrane": 1, "electron-dense deposits": 0}),
    ("No deposits are seen and the GBM is thin.",
     {"electron-dense deposits": 0, "thin glomerular basement membrane": 1}),
    ("No electron-dense deposits, fibrils or tubuloreticular inclusions are identified.",
     {"electron-dense deposits": 0, "fibrils": 0, "tubuloreticular inclusions": 0}),
    ("Electron-dense deposits, fibrils and tubuloreticular inclusions are not identified.",
     {"electron-dense deposits": 0, "fibrils": 0, "tubuloreticular inclusions": 0}),
    ("There are no subepithelial, subendothelial or mesangial electron-dense deposits.",
     {"subepithelial deposits": 0, "subendothelial deposits": 0, "mesangial deposits": 0}),
    ("Possible fibrils, no deposits.", {"fibrils": -1, "electron-dense deposits": 0}),
    ("No definite subepithelial deposits.", {"subepithelial deposits": 0}),
    ("Foot processes are largely preserved.", {"foot process effacement": 0}),
    ("Foot processes are not preserved.", {"foot process effacement": 1}),
    ("No deposits, consistent with minimal change disease.",
     {"electron-dense deposits": 0, "minimal change disease": 1}),
    ("The appearances are not suggestive of amyloidosis.", {"amyloidosis": 0}),
    ("FSGS, not otherwise specified.", {"focal segmental glomerulosclerosis": 1}),
    ("Minimal change disease versus FSGS.", {"minimal change disease": -1, "focal segmental glomerulosclerosis": -1}),
    ("Features suggestive of membranous nephropathy.", {"membranous nephropathy": -1}),
    ("Findings consistent with membranous nephropathy.", {"membranous nephropathy": 1}),
    ("?Fabry disease", {"Fabry disease": -1}),
    ("Deposits: none.", {"electron-dense deposits": 0}),
    # a negation and an uncertainty cue both cover the mention: uncertainty outranks negation (CheXpert's rule)
    ("No amyloid is suspected.", {"amyloidosis": -1}),
    ("No deposits are suspected.", {"electron-dense deposits": -1}),
])
def test_negation_and_uncertainty_scope(renal, text, expected):
    got = values(renal, text)
    assert {k: got[k] for k in expected} == expected, [(m.label, m.text, m.value, m.cue)
                                                       for m in renal.label(text).mentions]


# ---------------------------------------------------------------------------------------------- synonyms and variants
@pytest.mark.parametrize("text, label", [
    ("Findings are those of TBMN.", "thin basement membrane nephropathy"),
    ("Thin basement membrane disease.", "thin basement membrane nephropathy"),
    ("Consistent with MCD.", "minimal change disease"),
    ("Lipoid nephrosis.", "minimal change disease"),
    ("IgAN, Oxford MEST-C per light microscopy.", "IgA nephropathy"),
    ("Berger's disease.", "IgA nephropathy"),
    ("Collapsing FSGS.", "focal segmental glomerulosclerosis"),
    ("The lamina densa has a basket weave appearance.", "GBM lamellation"),
    ("The lamina densa has a basket-weave appearance.", "GBM lamellation"),
    ("Basketweave change of the GBM.", "GBM lamellation"),
    ("Sub-epithelial deposits.", "subepithelial deposits"),
    ("Thickened glomerular basement membranes.", "thickened glomerular basement membrane"),
    ("Podocytes contain zebra bodies.", "zebra bodies"),
    ("Haemolytic uraemic syndrome.", "thrombotic microangiopathy"),
    ("Organised deposits.", "organized deposits"),
    ("TRIs are present.", "tubuloreticular inclusions"),
    ("The mesangium contains electron-dense deposits.", "mesangial deposits"),
    ("Deposits are present in subendothelial locations.", "subendothelial deposits"),
    ("Fibrils measure 16-22 nm in diameter.", "fibrillary-type fibrils"),
    ("Randomly arranged fibrils averaging 9.5 nm.", "amyloid-type fibrils"),
    ("The GBM thickness averages 620 nm.", "thickened glomerular basement membrane"),
    ("Glomerular basement membranes measure 180 ± 25 nm (range 140-230 nm).", "thin glomerular basement membrane"),
])
def test_synonyms_abbreviations_and_measurements(renal, text, label):
    assert values(renal, text)[label] == 1


@pytest.mark.parametrize("text, label", [
    ("Glomerular deposition of matrix.", "electron-dense deposits"),  # word boundary: "deposition" is not "deposit"
    ("The mcd gene.", "minimal change disease"),  # abbreviations are case-sensitive
    ("Abnormal glomeruli.", "normal"),
    ("Glomerular basement membranes measure 450 ± 200 nm.", "thickened glomerular basement membrane"),  # irregular
    ("Glomerular basement membranes vary from 120 to 900 nm.", "thin glomerular basement membrane"),
    ("Non-amyloid fibrils.", "amyloidosis"),
])
def test_no_false_mentions(renal, text, label):
    assert values(renal, text)[label] in (None, 0)


# ---------------------------------------------------------------------------------------------- hierarchy
def test_hierarchy_roll_up_and_negation_down(renal):
    v = values(renal, "Subendothelial deposits are present.")
    assert v["subendothelial deposits"] == 1 and v["electron-dense deposits"] == 1
    v = values(renal, "Non-branching fibrils measuring 9 nm are present.")
    assert (v["amyloid-type fibrils"], v["fibrils"], v["organized deposits"]) == (1, 1, 1)
    v = values(renal, "Possible mesangial deposits.")
    assert v["mesangial deposits"] == -1 and v["electron-dense deposits"] == -1
    v = values(renal, "No electron-dense deposits are identified.")
    assert v["mesangial deposits"] == 0 and v["subepithelial humps"] == 0  # grandchild too
    result = renal.label("DIAGNOSIS: Collapsing glomerulopathy.")
    assert result.values["focal segmental glomerulosclerosis"] == 1 and result.values["podocytopathy"] == 1
    assert result.primary == "collapsing glomerulopathy"  # the most specific diagnosis, not its parent


def test_chexpert_hierarchy_is_positive_only(chexpert):
    v = values(chexpert, "Cardiomegaly.")
    assert v["Enlarged Cardiomediastinum"] == 1
    v = values(chexpert, "No focal opacity.")
    assert v["Lung Opacity"] == 0 and v["Edema"] is None  # CheXpert does not negate children
    v = values(chexpert, "The cardiac contours are stable.")  # a bare heart mention is no finding (docs/labeler.md)
    assert v["Cardiomegaly"] is None and v["Enlarged Cardiomediastinum"] is None


# ---------------------------------------------------------------------------------------------- CheXpert
@pytest.mark.parametrize("text, expected", [
    ("No pneumothorax.", {"Pneumothorax": 0, "No Finding": 1}),
    # the memo: "Hyperinflation. No evidence of acute disease." would be No Finding, but hyperinflation (an other
    # finding) suppresses it, and no descriptive label is mentioned: the study gets no label at all
    ("Hyperinflation. No evidence of acute disease.", {"No Finding": None, "Lung Opacity": None, "Edema": None}),
    ("No acute cardiopulmonary process.", {"No Finding": 1}),
    ("A large pleural effusion.", {"Pleural Effusion": 1, "No Finding": None}),
    ("The cardiac contours are stable.", {"Cardiomegaly": None, "No Finding": 1}),
    ("Heart size is at the upper limits of normal.", {"Cardiomegaly": -1, "No Finding": None}),
    ("Heart and mediastinum normal.", {"Cardiomegaly": 0}),
    ("Heart and mediastinum are unchanged.", {"Cardiomegaly": None, "Enlarged Cardiomediastinum": None}),
    ("There is no focal air space opacity to suggest a pneumonia.", {"Pneumonia": 0, "Lung Opacity": 0}),
    ("No definite pleural effusion seen.", {"Pleural Effusion": 0}),
    ("Opacity suggests pneumonia.", {"Pneumonia": -1, "Lung Opacity": 1}),
    ("No pneumothorax, possible small effusion.", {"Pneumothorax": 0, "Pleural Effusion": -1}),
    ("The consolidation is no longer visualized.", {"Consolidation": 0}),
    ("Surgical clips are present. Coronary artery stents visualized.", {"Support Devices": None}),
    ("Right chest tube has been removed.", {"Support Devices": 0}),
    ("Prominent vasculature, ? early CHF.", {"Edema": -1}),
    ("Left basilar atelectasis and/or small effusion.", {"Atelectasis": -1, "Pleural Effusion": -1}),
    ("No effusion, pneumothorax and/or consolidation.", {"Pneumothorax": 0, "Consolidation": 0}),
    ("The cardiac size cannot be evaluated.", {"Cardiomegaly": -1}),
    ("Heart size is normal. No pneumothorax or effusion.",
     {"Cardiomegaly": 0, "Pneumothorax": 0, "Pleural Effusion": 0, "No Finding": 1}),
    ("Heart size is not enlarged.", {"Cardiomegaly": 0}),
    ("Right PICC line terminates in the SVC. Lungs are clear.", {"Support Devices": 1, "No Finding": 1}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1, "No Finding": None}),
    ("Left basilar atelectasis versus pneumonia.", {"Atelectasis": -1, "Pneumonia": -1}),
    ("Small left effusion with adjacent atelectasis versus pneumonia.", {"Pleural Effusion": 1, "Atelectasis": -1}),
    ("Two small pneumothoraces. PTX on the right has resolved.", {"Pneumothorax": 1}),
    ("FINDINGS: No pleural effusion. IMPRESSION: Pulmonary edema.", {"Pleural Effusion": 0, "Edema": 1,
                                                                       "Lung Opacity": 1}),
    ("Small pericardial effusion.", {"Pleural Effusion": None, "No Finding": None}),
    ("INDICATION: Evaluate for pneumonia. FINDINGS: Lungs are clear.", {"Pneumonia": None, "No Finding": 1}),
])
def test_chexpert_examples(chexpert, text, expected):
    got = values(chexpert, text)
    assert {k: got[k] for k in expected} == expected
    assert got["No Finding"] in (1, None)  # CheXpert's No Finding is 1 or empty, never 0 or -1


def test_chexpert_vocab_has_the_14_observations(chexpert):
    assert chexpert.labels == [
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
        "Support Devices"]


# ---------------------------------------------------------------------------------------------- sections and primary
def test_primary_diagnosis_prefers_the_diagnosis_section(renal):
    text = ("CLINICAL HISTORY: Nephrotic syndrome, ?minimal change disease.\n"
            "ELECTRON MICROSCOPY: Fibrils measuring 18-22 nm. The differential includes amyloidosis.\n"
            "DIAGNOSIS (EM): Fibrillary glomerulonephritis.")
    result = renal.label(text)
    assert result.primary == "fibrillary glomerulonephritis" and result.primary_source == "diagnosis section"
    assert result.values["minimal change disease"] is None  # the clinical history is not read
    assert result.values["amyloidosis"] == -1
    assert renal.label("Clinical diagnosis: lupus nephritis. EM: no deposits.").values["lupus nephritis"] is None


def test_primary_diagnosis_falls_back_to_findings(renal):
    result = renal.label("Regularly spaced subepithelial deposits with GBM spikes. Foot processes are effaced.")
    assert (result.primary, result.primary_source) == ("membranous nephropathy", "findings")
    result = renal.label("Foot processes are preserved. No deposits. GBM of normal thickness.")
    assert (result.primary, result.primary_source) == ("normal", "no finding")
    assert renal.label("Adequate sample.").primary is None  # nothing mentioned: not "normal"


# ---------------------------------------------------------------------------------------------- hand-written reports
HAND_WRITTEN = [
    ("Electron microscopy: Three glomeruli. The glomerular basement membranes are diffusely attenuated, measuring a "
     "mean of 196 nm (normal adult range 300-400 nm). No lamellation or basket-weaving is seen. Podocytes are "
     "unremarkable with intact foot processes. No deposits.", "thin basement membrane nephropathy"),
    ("ULTRASTRUCTURE: The GBM shows marked variation in thickness from 110 to 820 nm with extensive splitting and "
     "multilamellation of the lamina densa producing a basketweave pattern; small round particles lie between the "
     "lamellae. Foot processes show segmental effacement (~30%). No immune-type deposits.\n"
     "COMMENT: The findings are characteristic of Alport syndrome; genetic testing (COL4A5) is recommended.",
     "Alport syndrome"),
    ("LIGHT MICROSCOPY: Glomeruli show stiff capillary loops.\nIMMUNOFLUORESCENCE: Granular capillary wall IgG (3+) "
     "and C3 (1+); PLA2R positive.\nELECTRON MICROSCOPY: Numerous sub-epithelial immune complex deposits with "
     "intervening basement membrane projections (spikes); foot processes are diffusely effaced. No mesangial or "
     "subendothelial deposits. No tubuloreticular inclusions.\nFINAL DIAGNOSIS: Membranous glomerulopathy, "
     "PLA2R-associated (Ehrenreich-Churg stage II).", "membranous nephropathy"),
    ("EM:\n- Mesangial electron dense deposits, some paramesangial.\n- GBM of normal thickness (~340 nm).\n"
     "- No subepithelial/subendothelial deposits.\n- Foot processes focally effaced.\n"
     "Impression: IgAN (MEST-C per LM report).", "IgA nephropathy"),
    ("Electron microscopy reveals subendothelial and mesangial electron-dense deposits, with occasional "
     "subepithelial deposits. Tubuloreticular inclusions are present in glomerular endothelial cells. Foot processes "
     "are effaced over about 50% of the capillary surface.\nInterpretation: Immune complex-mediated "
     "glomerulonephritis; the combination of subendothelial deposits and tubuloreticular inclusions raises the "
     "possibility of lupus nephritis (ISN/RPS class IV +/- V).", "lupus nephritis"),
    ("Ultrastructural findings: The mesangium and capillary walls are expanded by randomly arranged, non-branching "
     "fibrils averaging 9.5 nm in diameter. Congo red stain is positive with apple-green birefringence.\n"
     "Diagnosis: AL amyloidosis, lambda type.", "amyloidosis"),
    ("EM: Fibrillary deposits, 15-25 nm in diameter, randomly oriented, in mesangium and GBM; they are thicker than "
     "amyloid fibrils and Congo red was negative. DNAJB9 immunostain positive.\nConclusion: fibrillary "
     "glomerulonephritis.", "fibrillary glomerulonephritis"),
    ("Two glomeruli are sampled. Podocytes show diffuse (>90%) foot process effacement with microvillous "
     "transformation. The glomerular basement membranes are of normal thickness and texture. There are no "
     "electron-dense deposits. Endothelial cells are unremarkable.", "minimal change disease"),
    ("Electron microscopy: The GBMs are diffusely thickened, averaging 780 nm, and the mesangial matrix is increased "
     "with nodule formation (Kimmelstiel-Wilson nodules). Foot processes show patchy effacement. No immune-type "
     "deposits are identified.\nFinal Diagnosis: Diabetic glomerulosclerosis, nodular (RPS class III).",
     "diabetic nephropathy"),
    ("ELECTRON MICROSCOPY: The glomerular capillary loops are patent. Glomerular basement membranes are of normal "
     "thickness (mean 350 nm) and contour. Foot processes are preserved. No electron-dense deposits, fibrils or "
     "tubuloreticular inclusions are present.\nDIAGNOSIS: No significant ultrastructural abnormality.", "normal"),
    ("Glomeruli: 4. GBM thickness within normal limits. Foot processes intact. No deposits.\n"
     "Opinion: Within normal limits.", "normal"),
    ("EM: Subepithelial and subendothelial organized deposits composed of hollow microtubules measuring 30-45 nm, "
     "arranged in parallel arrays. No tubuloreticular inclusions.\nDIAGNOSIS: Immunotactoid glomerulopathy (ITG); "
     "evaluate for an underlying lymphoproliferative disorder.", "immunotactoid glomerulopathy"),
    ("Electron microscopy: Podocytes are distended by numerous lamellated, concentric myelin-like inclusions (zebra "
     "bodies); similar inclusions are seen in endothelial cells. Foot processes are focally effaced. No immune "
     "deposits.\nFinal diagnosis: Findings consistent with Fabry disease (Anderson-Fabry); hydroxychloroquine "
     "toxicity should be excluded clinically.", "Fabry disease"),
    ("ULTRASTRUCTURAL FINDINGS: Large subepithelial hump-shaped deposits and scattered mesangial deposits are "
     "present, with endocapillary hypercellularity and neutrophils.\nINTERPRETATION: Post-infectious "
     "(post-streptococcal) glomerulonephritis.", "post-infectious glomerulonephritis"),
    ("EM shows highly osmiophilic, ribbon-like dense deposits transforming the lamina densa of the GBM, also in "
     "Bowman capsule and tubular basement membranes.\nIMPRESSION: Dense deposit disease (C3 glomerulopathy).",
     "dense deposit disease"),
    ("Electron microscopy demonstrates finely granular, powdery electron-dense deposits along the inner aspect of the "
     "GBM and along the outer aspect of tubular basement membranes. No fibrils or microtubules. Nodular mesangial "
     "expansion.\nDiagnosis: Light chain deposition disease (kappa), see comment.", "light chain deposition disease"),
    ("The subendothelial space is widened by electron-lucent flocculent material, with endothelial swelling and loss "
     "of fenestrations. No immune-type electron-dense deposits are identified. Double contours are focally present.",
     "thrombotic microangiopathy"),
    ("EM: Extensive foot process effacement (approximately 80%) without deposits. The sample lacks sclerotic "
     "segments.\nDIAGNOSIS: Podocytopathy with diffuse foot process effacement. Minimal change disease is favoured; "
     "however, FSGS cannot be excluded given the sampling.", "minimal change disease"),
    ("Findings: GBMs show wrinkling and mild thickening (480 nm) consistent with ischemic change; foot processes "
     "mostly intact; no deposits.\nSummary: hypertension-related arterionephrosclerosis.",
     "hypertensive nephrosclerosis"),
    ("Capillary walls show regularly spaced subepithelial deposits with intervening GBM spikes. Mesangial deposits "
     "are not seen. Foot processes are extensively effaced.", "membranous nephropathy"),
    ("Subepithelial deposits with spikes and numerous endothelial tubuloreticular inclusions.\n"
     "DIAGNOSIS: Membranous lupus nephritis (ISN/RPS class V).", "lupus nephritis"),
    ("CLINICAL HISTORY: Nephrotic syndrome, ?minimal change disease. ?Amyloid.\nELECTRON MICROSCOPY: Glomerular "
     "basement membranes show diffuse subepithelial electron-dense deposits with spike formation.\n"
     "DIAGNOSIS: Membranous nephropathy, stage II. No evidence of amyloidosis.", "membranous nephropathy"),
    ("Ultrastructural examination: Paramesangial electron-dense deposits are present; no deposits are identified "
     "along the capillary walls. GBM thickness is within normal limits.\nDiagnosis: Mesangial proliferative "
     "glomerulonephritis in keeping with IgA nephropathy (Berger's disease).", "IgA nephropathy"),
    ("Electron microscopy: Uniformly thin GBMs (mean 210 nm). No lamellation.\nImpression: Thin basement membrane "
     "nephropathy favoured; early Alport syndrome cannot be excluded, genetic testing is recommended.",
     "thin basement membrane nephropathy"),
    ("Electron microscopy: randomly oriented, non-branching fibrils measuring 18-22 nm infiltrate the mesangium and "
     "glomerular basement membranes. Congo red stain is negative.", "fibrillary glomerulonephritis"),
    ("EM: Mesangial fibrils of approximately 10 nm. Comment: Fibrils of this size are suggestive of amyloid; Congo "
     "red stain is pending.", "amyloidosis"),
    ("Electron microscopy: The glomerulus is ultrastructurally unremarkable; basement membranes measure 330-380 nm; "
     "foot processes are well preserved; no deposits.\nConclusion: No diagnostic ultrastructural abnormality.",
     "normal"),
    ("Mesangial and subendothelial electron-dense deposits; IF shows C3 only.\nDIAGNOSIS: C3 glomerulonephritis.",
     "C3 glomerulonephritis"),
    ("Impression: Collapsing glomerulopathy (collapsing variant of FSGS) with endothelial tubuloreticular "
     "inclusions, raising the possibility of HIV-associated nephropathy.", "collapsing glomerulopathy"),
    # written after the vocabulary was frozen, as a check on over-fitting (all labelled correctly the first time)
    ("Ultrastructural study of 2 glomeruli. Capillary loops display diffuse thickening of the basement membranes, up "
     "to 900 nm, with mesangial sclerosis. There is no evidence of immune complex deposition.\nFINAL DIAGNOSIS:\n"
     "Diabetic nephropathy, ISN class IIb.", "diabetic nephropathy"),
    ("EM demonstrates effacement of virtually all foot processes. The GBMs are normal in thickness and no deposits "
     "or inclusions are seen. These findings, in the setting of nephrotic syndrome and normal LM, support a diagnosis "
     "of minimal change disease.", "minimal change disease"),
    ("Electron microscopic examination: scattered mesangial electron densities are noted. No capillary wall "
     "deposits. Podocytes retain their foot processes.\nDx: Mesangial immune complex deposition, compatible with IgA "
     "nephropathy.", "IgA nephropathy"),
    ("The lamina densa is split and laminated in numerous loops, alternating with attenuated segments measuring as "
     "little as 100 nm.\nIMPRESSION: Hereditary nephritis (Alport).", "Alport syndrome"),
    ("Sections show glomerular basement membranes with thickness ranging 150-220 nm throughout (mean 185 nm). No "
     "splitting. Deposits absent.\nDIAGNOSIS: thin GBM disease.", "thin basement membrane nephropathy"),
    ("EM: Numerous subepithelial and intramembranous deposits, some resorbing (lucent), with GBM remodeling. Stage "
     "III. PLA2R staining positive on IF.\nDIAGNOSIS: Primary membranous nephropathy.", "membranous nephropathy"),
    ("Electron microscopy: Large subendothelial 'wire-loop' deposits, mesangial deposits and rare subepithelial "
     "deposits. Numerous tubuloreticular inclusions in endothelial cytoplasm. Findings are those of diffuse "
     "proliferative lupus nephritis, ISN/RPS Class IV-G (A).", "lupus nephritis"),
    ("Glomerular deposits consist of randomly distributed non-branching fibrils of 7-10 nm thickness. Diagnosis: "
     "renal amyloidosis (typing by mass spectrometry pending).", "amyloidosis"),
    ("Mesangial and glomerular capillary wall deposits composed of randomly oriented fibrils measuring about 20 nm; "
     "no microtubular substructure. Congo red negative.\nIMPRESSION: Fibrillary GN (DNAJB9 positive).",
     "fibrillary glomerulonephritis"),
    ("Electron microscopy shows no abnormality. The basement membranes measure 320-400 nm, the foot processes are "
     "normal and there are no deposits.", "normal"),
    ("DIAGNOSIS: Normal glomeruli.", "normal"),
    ("The findings are those of thin basement membrane nephropathy; Alport syndrome is considered less likely given "
     "the absence of lamellation.", "thin basement membrane nephropathy"),
]


def test_hand_written_reports(renal, capsys):
    truth = [d for _, d in HAND_WRITTEN]
    table = renal.label_frame(pd.DataFrame({"report": [t for t, _ in HAND_WRITTEN]}))
    result = agreement(table, truth)
    wrong = [(t[:70], d, p) for (t, d), p in zip(HAND_WRITTEN, table["primary_diagnosis"]) if p != d]
    with capsys.disabled():
        print(f"\n[labeler] hand-written renal reports: accuracy {result.accuracy:.3f} "
              f"({round(result.accuracy * result.n)}/{result.n}); wrong: {wrong}")
    assert len(HAND_WRITTEN) >= 15
    assert result.accuracy >= 0.9, wrong


# ---------------------------------------------------------------------------------------------- agreement helper
def test_agreement_helper():
    labels = pd.DataFrame({"primary_diagnosis": ["normal", "IgA nephropathy", None, "normal"]})
    result = agreement(labels, ["normal", "IgA nephropathy", "normal", "amyloidosis"])
    assert result.accuracy == 0.5 and result.n == 4
    assert result.per_class.loc["normal", "precision"] == 0.5 and result.per_class.loc["normal", "recall"] == 0.5
    assert result.per_class.loc["amyloidosis", "recall"] == 0.0
    assert result.confusion.loc["normal", "(none)"] == 1 and result.confusion.loc["amyloidosis", "normal"] == 1
    assert "accuracy 0.500" in result.summary()
    with pytest.raises(ValueError, match="3 predictions but 2"):
        agreement(pd.Series(["a", "b", "c"]), ["a", "b"])


# ---------------------------------------------------------------------------------------------- vocabulary files
def test_custom_vocabulary_file(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text("name: mini\ninclude: []\nmacros:\n  loc: [left, right]\n"
                    "cues:\n  negation:\n    pre: ['no']\n"
                    "labels:\n  - name: widget\n    kind: diagnosis\n    synonyms: ['{loc} gadget']\n"
                    "    abbreviations: [WDG]\n  - name: part\n    parent: widget\n")
    labeler = Labeler(path)
    assert labeler.label("Left gadget.").values["widget"] == 1
    assert labeler.label("No WDG.").values["widget"] == 0
    assert labeler.label("A part.").values == {"widget": 1, "part": 1}
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels:\n  - name: a\n    parent: nowhere\n")
    with pytest.raises(VocabError, match="unknown label 'nowhere'"):
        load_vocab(bad)
    bad.write_text("labels:\n  - name: a\n    synonyms: [no]\n")  # YAML reads a bare no as False
    with pytest.raises(VocabError, match="quote YAML words"):
        load_vocab(bad)
    with pytest.raises(VocabError, match="neither a bundled one"):
        load_vocab("no-such-vocab")


def test_a_compiled_vocabulary_is_reused_until_one_of_its_files_changes(tmp_path):
    """Compiling takes a second, so a process keeps it; an edit of the file or of a file it includes is seen."""
    part = tmp_path / "part.yaml"
    part.write_text("labels:\n  - name: part\n")
    path = tmp_path / "main.yaml"
    path.write_text("name: main\ninclude: [part.yaml]\nlabels:\n  - name: widget\n")
    first = load_vocab(path)
    assert load_vocab(str(path)) is first and set(first.labels) == {"widget", "part"}
    path.write_text("name: main\ninclude: [part.yaml]\nlabels:\n  - name: gadget\n")
    assert set(load_vocab(path).labels) == {"gadget", "part"}
    part.write_text("labels:\n  - name: piece\n")
    assert set(load_vocab(path).labels) == {"gadget", "piece"}


def test_bundled_renal_vocab_covers_the_cohort_diagnoses(renal):
    cohort = ["normal", "thin basement membrane nephropathy", "diabetic nephropathy", "Alport syndrome",
              "minimal change disease", "membranous nephropathy", "IgA nephropathy", "lupus nephritis", "amyloidosis",
              "fibrillary glomerulonephritis"]
    kinds = {n: s.kind for n, s in renal.vocab.labels.items()}
    assert all(kinds.get(d) == "diagnosis" for d in cohort)
    assert sum(k == "diagnosis" for k in kinds.values()) >= 25  # common renal EM diagnoses beyond the cohort


# ---------------------------------------------------------------------------------------------- command line
def test_cli_writes_a_labels_table(tmp_path, capsys):
    src = tmp_path / "reports.csv"
    pd.DataFrame({"patient_id": ["P1", "P2", "P3"],
                  "report": ["No deposits but thin GBM. DIAGNOSIS: TBMN.", "Cannot exclude amyloid.", "Fibrils."],
                  "diagnosis": ["thin basement membrane nephropathy", "amyloidosis", "normal"]}
                 ).to_csv(src, index=False)
    assert labels_main([str(src), "--vocab", "renal", "--out", str(tmp_path / "labels.csv")]) == 0
    out = capsys.readouterr().out
    assert "accuracy 0.667 (2/3)" in out
    lines = (tmp_path / "labels.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:3] == ["patient_id", "primary_diagnosis", "primary_value"]
    row = dict(zip(header, lines[2].split(",")))
    assert row["amyloidosis"] == "-1" and row["electron-dense deposits"] == "" and row["patient_id"] == "P2"
    row = dict(zip(header, lines[1].split(",")))
    assert row["electron-dense deposits"] == "0" and row["thin glomerular basement membrane"] == "1"
    assert labels_main([str(src), "--vocab", "chexpert", "--out", str(tmp_path / "cx.csv")]) == 0
    assert "No Finding" in (tmp_path / "cx.csv").read_text().splitlines()[0]


def test_cli_errors_name_the_file_and_row(tmp_path, capsys):
    src = tmp_path / "reports.csv"
    pd.DataFrame({"patient_id": ["P1", "P2"], "text": ["a", "b"]}).to_csv(src, index=False)
    assert labels_main([str(src), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "missing required column(s) 'report'" in err
    pd.DataFrame({"patient_id": ["P1", "P2", "P3"], "report": ["No deposits.", "  ", ""]}).to_csv(src, index=False)
    assert labels_main([str(src), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert "row 2 (patient_id P2)" in err and "row 3 (patient_id P3)" in err and "empty 'report'" in err
    assert labels_main([str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o.csv")]) == 2
    assert "file not found" in capsys.readouterr().err
    pd.DataFrame({"patient_id": ["P1"], "report": ["x"]}).to_csv(src, index=False)
    assert labels_main([str(src), "--vocab", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o.csv")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- embedded cohort
@pytest.fixture(scope="module")
def cohort_reports(tmp_path_factory) -> pd.DataFrame:
    from emclip.synthetic import generate_cohort

    kwargs = {k: v for k, v in (("workers", 1), ("progress", False))
              if k in inspect.signature(generate_cohort).parameters}
    out = generate_cohort(tmp_path_factory.mktemp("labels_cohort"), n_patients=60, seed=11, image_size=64, **kwargs)
    return pd.read_csv(out / "reports.csv")


def test_agreement_with_the_embedded_cohort(renal, cohort_reports, capsys):
    full = agreement(renal.label_frame(cohort_reports), cohort_reports["diagnosis"])
    # the findings alone (diagnosis section cut off) test mention extraction, negation and the inference rules
    findings = cohort_reports["report"].str.split("\n").str[0]
    inferred = agreement(renal.label_frame(cohort_reports.assign(report=findings)), cohort_reports["diagnosis"])
    with capsys.disabled():
        print(f"\n[labeler] embedded cohort (60 patients): accuracy {full.accuracy:.3f} with the diagnosis section, "
              f"{inferred.accuracy:.3f} from the findings alone\n{full.summary()}")
    assert full.accuracy >= 0.95, full.summary()
    assert inferred.accuracy >= 0.85, inferred.summary()
