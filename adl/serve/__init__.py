"""The backbone with trained heads attached: ``Predictor`` (Python) and ``adl predict``."""

from adl.serve.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
