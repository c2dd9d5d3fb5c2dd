"""The Inception-v3 (2015-12-05) feature extractor behind FID and IS, loaded from a local file.

EG3D and StyleGAN2-ADA/StyleGAN3 metrics use a TorchScript translation of the TensorFlow graph
``inception-2015-12-05.tgz``. No machine of ours reaches the internet, so the file is read from
``cfg.eval.inception_weights``; a missing file is a :class:`~g3dr.errors.WeightsError` that says where to
get it. There is never a silent fallback to random or torchvision weights in a real run.

The interface of the real file (what :class:`InceptionDetector` relies on, and what the tests' tiny
random-weight stand-in reproduces)::

    module(img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False)

- ``img``: ``uint8`` tensor ``(N, 3, H, W)``, RGB, any H, W (resized inside to 299 x 299, bilinear) on
  the module's device. It is scaled inside by ``(x - 128) / 128``.
- ``return_features=True``: the 2048-d pool3 features, float32 ``(N, 2048)`` (FID).
- otherwise: softmax class probabilities over 1008 classes, float32 ``(N, 1008)``; with
  ``no_output_bias=True`` the logits omit the output layer's bias (IS, as the original TF code).

Files: ``inception-2015-12-05.pt`` (a ``torch.jit.save`` archive; loaded with ``torch.jit.load``) or the
StyleGAN3 ``inception-2015-12-05.pkl`` (a pickle of the same module; loaded with ``pickle``, so only use a
file from the official URL).
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path

import torch

from g3dr.errors import WeightsError
from g3dr.log import get_logger

log = get_logger("g3dr.metrics")

FEATURE_DIM = 2048
NUM_CLASSES = 1008
INCEPTION_URL_PT = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_URL_PKL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/"
                     "inception-2015-12-05.pkl")


def quantize_images(rgb: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] ``(N, 3, H, W)`` to uint8 as the EG3D protocol does: ``(x * 127.5 + 128)``,
    clamped to [0, 255] and truncated. A uint8 image ``v`` decoded as ``v / 127.5 - 1`` maps back to ``v``.
    """
    if rgb.ndim != 4 or rgb.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 3, H, W) or (N, 1, H, W), got {tuple(rgb.shape)}")
    img = (rgb.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return img.expand(-1, 3, -1, -1) if img.shape[1] == 1 else img


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (identifies the detector in cache keys and MLflow params)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class InceptionDetector:
    """A loaded Inception network: :meth:`features` for FID, :meth:`probabilities` for IS.

    Both take uint8 images ``(N, 3, H, W)`` (see :func:`quantize_images`) and return float32 CPU tensors;
    no gradients flow. ``sha256`` identifies the weights file.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device | str, path: Path, sha256: str):
        self.module = module
        self.device = torch.device(device)
        self.path = path
        self.sha256 = sha256

    def _call(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the Inception detector takes uint8 (N, 3, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}; use quantize_images()")
        with torch.no_grad():
            out = self.module(images.to(self.device), **kwargs)
        return out.float().cpu()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pool features ``(N, 2048)``."""
        out = self._call(images, return_features=True)
        if out.shape != (images.shape[0], FEATURE_DIM):
            raise WeightsError(f"{self.path}: return_features=True gave shape {tuple(out.shape)}, expected "
                               f"({images.shape[0]}, {FEATURE_DIM}); this is not the 2015-12-05 Inception network")
        return out

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(N, 1008)`` without the output bias (the IS protocol)."""
        out = self._call(images, no_output_bias=True)
        if out.ndim != 2 or out.shape[0] != images.shape[0] or out.shape[1] != NUM_CLASSES:
            raise WeightsError(f"{self.path}: class output has shape {tuple(out.shape)}, expected "
                               f"({images.shape[0]}, {NUM_CLASSES}); this is not the 2015-12-05 Inception network")
        return out


def load_inception(path: str | Path, device: torch.device | str = "cpu") -> InceptionDetector:
    """Load the Inception network from a local ``.pt`` (TorchScript) or ``.pkl`` (StyleGAN3) file.

    Raises :class:`~g3dr.errors.WeightsError` naming the file and the download URL when it is missing,
    and when it cannot be read as the expected module.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"Inception weights not found at {path}. On a machine with internet, run "
            f"`g3dr weights fetch inception-2015-12-05 --dest {path}` (it downloads {INCEPTION_URL_PT}; or the "
            f"StyleGAN3 pickle {INCEPTION_URL_PKL}), copy it to {path}, or point eval.inception_weights at it")
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as f:
                module = pickle.load(f)
        else:
            with warnings.catch_warnings():  # the file *is* TorchScript; its deprecation is not the user's to fix
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location=torch.device(device))
    except Exception as err:  # corrupt or wrong file: any loader error is the user's to fix
        raise WeightsError(f"cannot load the Inception network from {path} ({type(err).__name__}: {err}); "
                           f"re-download {INCEPTION_URL_PT}") from None
    if not isinstance(module, torch.nn.Module) and not isinstance(module, torch.jit.ScriptModule):
        raise WeightsError(f"{path} holds a {type(module).__name__}, not the Inception module; "
                           f"re-download {INCEPTION_URL_PT}")
    module = module.to(device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    digest = file_sha256(path)
    log.info("loaded Inception network from %s (sha256 %s...)", path, digest[:12])
    return InceptionDetector(module, device, path, digest)
