"""Pooled features of a frozen text tower, computed once per report.

With ``lock_text`` only the text projection trains, so the transformer's pooled output of each report never
changes; computing it once removes the text transformer from every training step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextFeatures:
    index: dict[str, int]          # patient_id -> row
    features: torch.Tensor         # (P, D) pooled, unprojected

    @classmethod
    @torch.no_grad()
    def build(cls, model, cohort, batch_size: int = 64) -> "TextFeatures":
        ids = list(cohort.reports.patient_id)
        texts = list(cohort.reports.report)
        was_training = model.training
        model.eval()
        chunks = [model.encode_text_pooled(texts[i:i + batch_size]).float().cpu()
                  for i in range(0, len(texts), batch_size)]
        model.train(was_training)
        return cls({pid: i for i, pid in enumerate(ids)}, torch.cat(chunks))

    def lookup(self, patient_ids: list[str]) -> torch.Tensor:
        return self.features[[self.index[p] for p in patient_ids]]
