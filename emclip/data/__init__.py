"""Cohort contract, image IO and patient bags."""
from .bags import BagDataset, collate_bags
from .cohort import UNLABELLED, Cohort, CohortError, Problem, load_cohort, validate_cohort
from .diagnoses import SOURCES as DIAGNOSIS_SOURCES
from .diagnoses import LabelOptions
from .images import ImageInfo, ImageReadError, ImageReadWarning, ImageTransform, probe_image, read_image
from .splits import assign_splits

__all__ = ["BagDataset", "collate_bags", "Cohort", "CohortError", "Problem", "load_cohort", "validate_cohort",
           "LabelOptions", "DIAGNOSIS_SOURCES", "UNLABELLED",
           "ImageInfo", "ImageReadError", "ImageReadWarning", "ImageTransform", "probe_image", "read_image",
           "assign_splits"]
