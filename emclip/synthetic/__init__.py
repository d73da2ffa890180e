"""The embedded synthetic renal EM cohort: ultrastructure rendering, disease specifications, report writer."""
from .cohort import generate_cohort
from .render import render_field
from .reports import write_report
from .specs import confusable_pairs, diagnoses, load_specs, sample_patient

__all__ = ["generate_cohort", "render_field", "write_report", "confusable_pairs", "diagnoses", "load_specs",
           "sample_patient"]
