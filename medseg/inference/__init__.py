"""Inference: Predictor, overlap-tile prediction, TTA, ensembles, post-processing, measurements, outputs
(masks, probabilities, uncertainty, DICOM SEG) and ONNX export. Never imports medseg.engine."""

from medseg.inference.postprocess import measure, postprocess_mask
from medseg.inference.predictor import Prediction, Predictor
from medseg.inference.protocol import ScanPredictor

__all__ = ["Prediction", "Predictor", "ScanPredictor", "measure", "postprocess_mask"]
