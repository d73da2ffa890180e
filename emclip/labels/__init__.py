"""Report labeler: diagnoses and findings from free-text reports, with negation, uncertainty and a label hierarchy.

>>> from emclip.labels import Labeler
>>> Labeler("renal").label("No deposits but thin GBM. DIAGNOSIS: Thin basement membrane nephropathy.").primary
'thin basement membrane nephropathy'

``python -m emclip.labels REPORTS.csv --vocab renal`` writes a labels table; see ``docs/labeler.md``.
"""

from .agreement import Agreement, agreement
from .labeler import NEGATIVE, POSITIVE, UNCERTAIN, Labeler, Mention, ReportLabels, label_reports
from .vocab import BUNDLED, Vocabulary, VocabError, load_vocab

__all__ = ["Agreement", "agreement", "Labeler", "Mention", "ReportLabels", "label_reports", "load_vocab", "Vocabulary",
           "VocabError", "BUNDLED", "POSITIVE", "NEGATIVE", "UNCERTAIN"]
