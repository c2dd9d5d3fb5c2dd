"""Monocular depth for ImageNet images without precomputed depth: a ``transformers`` depth model.

Any depth-estimation model that ``transformers`` loads with ``AutoModelForDepthEstimation`` (Depth
Anything V1/V2, DPT/MiDaS, ...) from a **local directory** (``config.json``, weights and
``preprocessor_config.json``; no hub access at run time). Needs the optional extra ``depth``
(``pip install 'g3dr-scale[depth]'``). Batched; on CUDA when present.

Mapping to the release encoding (recorded in every sample's metadata): the prediction of a square crop
is resized (bicubic) to the stored resolution; robust per-image bounds ``lo, hi`` are its 1st and 99th
percentiles; relative models predict inverse depth (disparity), so ``n = (hi - x) / (hi - lo)`` (near = 0),
metric models predict depth, so ``n = (x - lo) / (hi - lo)``; ``n`` is clipped to [0, 1] and stored as
``round(n * 65535)``, i.e. depth = 4 + 2 n in [4, 6] after the release decoding - the same per-image
affine normalisation as the released LeReS maps, whose codes span [0, 65535] in every image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from g3dr.errors import WeightsError
from g3dr.log import get_logger

log = get_logger("g3dr.data_prep")

PERCENTILES = (1.0, 99.0)
_METRIC_TYPES = ("zoedepth", "glpn", "depth_pro")


def preload() -> None:
    """Import torch and transformers now, so that forked prep workers inherit them instead of each
    spending seconds importing them; a missing transformers is reported later, by :class:`DepthEstimator`."""
    try:
        import torch  # noqa: F401
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation  # noqa: F401
    except ImportError:
        pass


def codes_from_prediction(prediction: np.ndarray, inverse: bool, percentiles=PERCENTILES) -> tuple[np.ndarray, bool]:
    """(H, W) float prediction -> (uint16 codes in the release encoding, degenerate).

    ``degenerate`` is True when the prediction is constant (then every code is 32768, depth 5).
    """
    x = prediction.astype(np.float64)
    lo, hi = np.percentile(x, percentiles)
    if not hi > lo:
        return np.full(x.shape, 32768, dtype=np.uint16), True
    n = (hi - x) / (hi - lo) if inverse else (x - lo) / (hi - lo)
    return np.rint(np.clip(n, 0.0, 1.0) * 65535).astype(np.uint16), False


class DepthEstimator:
    """A depth model loaded from ``path``; :meth:`predict_codes` maps a batch of square RGB images to uint16 codes."""

    def __init__(self, path: str, device: str = "auto"):
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise WeightsError(
                f"no depth model at {folder} (expected config.json, weights and preprocessor_config.json). "
                "Download one on a machine with hub access, e.g. "
                "'huggingface-cli download depth-anything/Depth-Anything-V2-Small-hf --local-dir weights/depth-anything-v2-small', "
                "and pass that folder to --depth-model")
        try:
            import torch
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation
        except ImportError as err:
            raise WeightsError(f"the depth-model backend needs transformers ({err}); install the extra: "
                               "pip install 'g3dr-scale[depth]'") from None
        self._torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise WeightsError(f"cannot load the depth model from {folder}: {err}") from None
        self.model.eval().to(self.device)
        config = self.model.config
        self.inverse = not (getattr(config, "depth_estimation_type", "relative") == "metric"
                            or config.model_type in _METRIC_TYPES)
        self.name = f"{config.model_type}:{folder.name}"
        self.mapping: dict[str, Any] = {
            "kind": "per_image_percentile_affine",
            "model": self.name,
            "prediction": "inverse_depth" if self.inverse else "depth",
            "percentiles": list(PERCENTILES),
            "formula": ("n = (hi - x) / (hi - lo)" if self.inverse else "n = (x - lo) / (hi - lo)")
                       + ", clipped to [0, 1]; code = round(n * 65535); depth = 4 + 2 n",
            "resize": "bicubic to the stored resolution",
        }
        self._degenerate_logged = False
        log.info("depth model %s on %s (%s output)", self.name, self.device, self.mapping["prediction"])

    def predict(self, images: Sequence[Image.Image], size: int) -> np.ndarray:
        """Raw model output for square RGB images, resized to (B, size, size) float32."""
        torch = self._torch
        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.inference_mode():
            predicted = self.model(**inputs).predicted_depth  # (B, h, w)
        resized = torch.nn.functional.interpolate(predicted[:, None].float(), size=(size, size), mode="bicubic",
                                                  align_corners=False)[:, 0]
        return resized.cpu().numpy()

    def predict_codes(self, images: Sequence[Image.Image], size: int) -> list[np.ndarray]:
        """uint16 codes (size, size) per image in the release encoding (see the module docstring)."""
        out = []
        for prediction in self.predict(images, size):
            codes, degenerate = codes_from_prediction(prediction, self.inverse)
            if degenerate and not self._degenerate_logged:
                log.warning("the depth model predicted a constant map; stored as depth 5 (is the model trained?)")
                self._degenerate_logged = True
            out.append(codes)
        return out
