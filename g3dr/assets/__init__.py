"""From one photo to a 3D asset: meshes, videos, batch lifting and RGB-D generation (see ``docs/assets.md``).

Everything here consumes a trained f_trigen (:mod:`g3dr.models`) and the renderer (:mod:`g3dr.render`);
nothing here trains or changes them. Optional dependencies (``mesh``, ``video``, ``depth``, ``generate``
extras) are imported inside the functions that need them, with a :class:`~g3dr.errors.ConfigError`
naming the extra when missing.
"""
