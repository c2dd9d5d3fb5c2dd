"""Evaluation metrics of G3DR (paper S.5): FID, IS, NFS and depth accuracy.

Pure numerics on arrays and tensors, plus the Inception-v3 feature extractor, the cached dataset
statistics and exact multi-rank gathering. Nothing here imports mlflow; the jobs in ``eval/``
(``g3dr.eval``) turn these numbers into runs, tables and plots.
"""

from g3dr.metrics.depth import depth_accuracy, non_flatness_score
from g3dr.metrics.fid import FeatureMoments, frechet_distance
from g3dr.metrics.inception_score import inception_score

__all__ = [
    "FeatureMoments",
    "depth_accuracy",
    "frechet_distance",
    "inception_score",
    "non_flatness_score",
]
