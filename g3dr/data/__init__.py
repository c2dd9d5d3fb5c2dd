"""The data module: WebDataset shards -> batches of RGB + depth for training and evaluation.

``build_train_loader(cfg, dist)`` and ``build_eval_loader(cfg, dist, shards=None)`` yield dicts
``rgb`` (B, 3, H, W) in [-1, 1], ``depth`` (B, 1, H, W), ``label`` (B,), ``key`` list[str];
``encode_depth_png`` / ``decode_depth_png`` are the release depth encoding (exact uint16).
Also here because library code needs them: the shard-writing engine (``shard_writer``), the release and
ImageNet sources (``sources``), the procedural RGB-D set (``synth``) and the monocular depth backend (``depth_model``); ``g3dr prep`` (``data_prep/``)
drives them. See ``docs/data.md``. Imports of torch happen only when the loaders are used.
"""

from g3dr.data.depth_codec import decode_depth_png, encode_depth_png

__all__ = ["build_eval_loader", "build_train_loader", "decode_depth_png", "encode_depth_png"]


def __getattr__(name: str):
    if name in ("build_train_loader", "build_eval_loader"):
        from g3dr.data import loader

        return getattr(loader, name)
    raise AttributeError(name)
