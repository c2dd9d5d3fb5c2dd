"""Evaluation metrics of G3DR (paper S.5): FID, IS, NFS and depth accuracy; PSNR and masked DA against
ground-truth views of the synthetic set (:mod:`g3dr.metrics.views`).

Pure numerics on arrays and tensors, plus the Inception-v3 feature extractor, the cached dataset
statistics and exact multi-rank gathering. Nothing here imports mlflow; the jobs in ``eval/``
(``g3dr.eval``) turn these numbers into runs, tables and plots.
"""

from g3dr.metrics.depth import depth_accuracy, non_flatness_score
from g3dr.metrics.fid import FeatureMoments, frechet_distance
from g3dr.metrics.inception_score import inception_score
from g3dr.metrics.views import masked_depth_accuracy_per_map, psnr_per_image

__all__ = [
    "FeatureMoments",
    "depth_accuracy",
    "frechet_distance",
    "inception_score",
    "masked_depth_accuracy_per_map",
    "non_flatness_score",
    "psnr_per_image",
]
