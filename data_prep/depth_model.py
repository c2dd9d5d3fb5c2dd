"""The depth-model backend now lives in the library, :mod:`g3dr.data.depth_model` (library code uses it
too, and the library must not import job packages); these names stay importable from here."""

from g3dr.data.depth_model import PERCENTILES, DepthEstimator, codes_from_prediction, preload  # noqa: F401
