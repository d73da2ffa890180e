"""Cohort contract, image IO and patient bags."""
from .bags import BagDataset, collate_bags
from .cohort import Cohort, CohortError, Problem, load_cohort, validate_cohort
from .images import ImageReadError, ImageTransform, read_image
from .splits import assign_splits

__all__ = ["BagDataset", "collate_bags", "Cohort", "CohortError", "Problem", "load_cohort", "validate_cohort",
           "ImageReadError", "ImageTransform", "read_image", "assign_splits"]
