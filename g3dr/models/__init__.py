"""f_trigen: the U-Net that lifts RGB-D to a triplane, the triplane decoder, the model the engine wraps,
and its checkpoint format (see ``docs/models.md``)."""

from g3dr.models.checkpoint_io import load_f_trigen, save_f_trigen
from g3dr.models.decoder import TriplaneDecoder
from g3dr.models.f_trigen import FTrigen
from g3dr.models.unet import TriplaneGenerator

__all__ = ["FTrigen", "TriplaneDecoder", "TriplaneGenerator", "load_f_trigen", "save_f_trigen"]
