"""The backbone with trained heads attached: ``Predictor`` (Python), ``adl predict``, ``adl serve``
and ``attach`` (heads on the user's own model object)."""

from adl.serve.attach import Attached, AttachedPrediction, attach
from adl.serve.predictor import Prediction, Predictor

__all__ = ["Attached", "AttachedPrediction", "Prediction", "Predictor", "attach"]
