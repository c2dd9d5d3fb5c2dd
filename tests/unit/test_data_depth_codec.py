"""The release depth encoding: exact uint16 round trip, float encode/decode, 8-bit rejection."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from g3dr.data.depth_codec import (decode_depth_png, decode_u16_png, encode_depth_png, encode_u16_png,
                                   u16_from_depth)
from g3dr.errors import DataError


def test_u16_round_trip_is_exact_over_the_full_range():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 65536, size=(37, 41), dtype=np.uint16)
    codes[0, :4] = [0, 1, 65534, 65535]
    out = decode_u16_png(encode_u16_png(codes))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, codes)
    # uint16 input to encode_depth_png is stored as is
    np.testing.assert_array_equal(decode_u16_png(encode_depth_png(codes)), codes)


def test_float_depth_decodes_within_half_a_quantisation_step():
    rng = np.random.default_rng(1)
    depth = rng.uniform(4.0, 5.999, size=(16, 16))
    decoded = decode_depth_png(encode_depth_png(depth))
    assert decoded.dtype == np.float32
    assert np.abs(decoded - depth).max() <= 1.0 / 65536 + 1e-6  # half of the 2/65536 step, plus float32


def test_release_formula_and_clipping():
    np.testing.assert_array_equal(u16_from_depth(np.array([4.0, 5.0, 3.0, 7.0])), [0, 32768, 0, 65535])
    assert decode_depth_png(encode_u16_png(np.array([[32768]], dtype=np.uint16)))[0, 0] == 5.0


def test_release_png_decodes_like_pil(release_samples):
    path = next(iter(sorted(release_samples.rglob("*_depth.png"))))
    data = path.read_bytes()
    expected = np.array(Image.open(path)).astype(np.float64) / 65536 * 2 + 4
    np.testing.assert_allclose(decode_depth_png(data), expected, atol=1e-6)
    assert decode_u16_png(data).max() > 255  # really 16-bit content


def test_eight_bit_depth_is_rejected_not_rescaled():
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)).save(buf, format="PNG")
    with pytest.raises(DataError, match="8-bit"):
        decode_u16_png(buf.getvalue())


def test_nan_depth_is_an_error():
    with pytest.raises(DataError, match="NaN"):
        u16_from_depth(np.array([np.nan]))


def test_our_png_is_standard_and_takes_the_fast_path():
    from g3dr.data.depth_codec import _decode_unfiltered_u16_png

    codes = np.random.default_rng(2).integers(0, 65536, size=(9, 13), dtype=np.uint16)
    for level in (0, 6):
        data = encode_u16_png(codes, level)
        with Image.open(io.BytesIO(data)) as image:  # an independent PNG reader
            assert image.mode == "I;16" and image.size == (13, 9)
            np.testing.assert_array_equal(np.array(image), codes)
        np.testing.assert_array_equal(_decode_unfiltered_u16_png(data), codes)


def test_filtered_pngs_fall_back_to_pil():
    from g3dr.data.depth_codec import _decode_unfiltered_u16_png

    codes = np.tile(np.arange(0, 64000, 1000, dtype=np.uint16), (8, 1))
    buf = io.BytesIO()
    Image.fromarray(codes).save(buf, format="PNG", optimize=True)  # PIL picks row filters
    data = buf.getvalue()
    np.testing.assert_array_equal(decode_u16_png(data), codes)
    fast = _decode_unfiltered_u16_png(data)
    assert fast is None or np.array_equal(fast, codes)
