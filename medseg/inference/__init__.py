"""Inference: Predictor, overlap-tile prediction, TTA, ensembles, post-processing. Never imports medseg.engine."""

from medseg.inference.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
