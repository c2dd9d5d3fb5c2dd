"""Cameras and the triplane volume renderer (functional core + thin module).

Model and render code never import deepspeed, mlflow or submitit.
"""

from g3dr.render.cameras import (
    camera_to_world_from_angles,
    canonical_angles,
    rays_from_cameras,
    sample_novel_angles,
    video_trajectory,
)
from g3dr.render.renderer import RenderResult, TriplaneRenderer, render_rays

__all__ = [
    "camera_to_world_from_angles",
    "canonical_angles",
    "rays_from_cameras",
    "sample_novel_angles",
    "video_trajectory",
    "RenderResult",
    "TriplaneRenderer",
    "render_rays",
]
