"""mmocr's own metrics on plain Python inputs, shared by the training job and ``make eval-ocr``."""

from __future__ import annotations

import numpy as np


def rec_metrics(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """mmocr's WordMetric (exact / ignore_case_symbol) and CharMetric on (prediction, truth) pairs."""
    from mmocr.evaluation import CharMetric, WordMetric

    samples = [{"pred_text": {"item": p}, "gt_text": {"item": g}} for p, g in pairs]
    word, char = WordMetric(mode=["exact", "ignore_case_symbol"]), CharMetric()
    word.process([], samples)
    char.process([], samples)
    return {**word.compute_metrics(word.results), **char.compute_metrics(char.results)}


def det_metrics(preds: list[tuple[list[np.ndarray], list[float]]],
                gts: list[tuple[list[np.ndarray], list[bool]]]) -> dict[str, float]:
    """mmocr's HmeanIOUMetric on per-image (polygons, scores) against (polygons, ignored)."""
    from mmocr.evaluation import HmeanIOUMetric

    metric = HmeanIOUMetric()
    for (pp, ps), (gp, gi) in zip(preds, gts, strict=True):
        metric.process([], [{
            "pred_instances": {"polygons": [np.asarray(p, np.float32).reshape(-1) for p in pp],
                               "scores": np.asarray(ps, np.float32)},
            "gt_instances": {"polygons": [np.asarray(p, np.float32).reshape(-1) for p in gp],
                             "ignored": np.asarray(gi, bool)},
        }])
    return metric.compute_metrics(metric.results)
