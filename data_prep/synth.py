"""The procedural RGB-D set now lives in the library, :mod:`g3dr.data.synth` (the loaders create it on
first use, and the library must not import job packages); these names stay importable from here for
existing callers."""

from g3dr.data.synth import (CLASS_NAMES, MAX_EXTENT, WALL_Z, Primitive, SynthCamera, SyntheticSource,  # noqa: F401
                             _hit, camera_rays, intersect_local, random_primitive, render_primitive, synth_sample,
                             write_synthetic_shards)
