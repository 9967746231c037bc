import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from cxrflow.data.imaging import ImageError, load_and_resize, load_gray, pad_square, preprocess, resize_gray
from cxrflow.errors import CxrflowError


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)).save(buf, "PNG")
    return buf.getvalue()


def _xray(h: int = 96, w: int = 96, seed: int = 0) -> np.ndarray:
    """A smooth gray image with some texture (resizing filters agree on it within a level or two)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = 120 + 70 * np.sin(4 * x) * np.cos(3 * y) + rng.normal(0, 6, (h, w))
    return np.clip(base, 0, 255).astype(np.uint8)


def _reference(img: Image.Image, size: int) -> np.ndarray:
    """An independent resize (plain bilinear, no reducing gap) of an 8-bit gray square image."""
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)


def test_l_png_is_as_is_and_resize_close_to_independent_pillow(tmp_path):
    gray = _xray()
    path = tmp_path / "a.png"
    path.write_bytes(_png(gray))
    decoded, orig = load_gray(path)
    assert orig == (96, 96) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, gray)
    out = preprocess(path, [24, 48])
    assert set(out) == {24, 48}
    for s, arr in out.items():
        assert arr.shape == (s, s) and arr.dtype == np.uint8
        assert np.abs(arr - _reference(Image.fromarray(gray), s)).mean() < 2.0


def test_modes_follow_the_documented_rule():
    gray = _xray()
    rgb = np.stack([gray, gray, gray], axis=-1)
    rgba = np.concatenate([rgb, np.full(gray.shape + (1,), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(load_gray(_png(rgba))[0], gray)  # RGBA: alpha dropped, gray kept
    half_transparent = rgba.copy()
    half_transparent[..., 3] = 128
    np.testing.assert_array_equal(load_gray(_png(half_transparent))[0], gray)  # not composited
    np.testing.assert_array_equal(load_gray(_png(np.stack([gray, gray], -1).astype(np.uint8), "LA"))[0], gray)
    color = np.zeros((4, 4, 3), np.uint8)
    color[..., 0] = 200
    color[..., 1] = 100
    color[..., 2] = 50
    expected = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)
    assert abs(int(load_gray(_png(color))[0][0, 0]) - expected) <= 1  # ITU-R 601 luma
    indexed = Image.fromarray(gray)
    indexed.putpalette([255 - i for i in range(256) for _ in range(3)])  # inverted gray palette
    assert indexed.mode == "P"
    buf = io.BytesIO()
    indexed.save(buf, "PNG")
    np.testing.assert_array_equal(load_gray(buf.getvalue())[0], 255 - gray)  # palette applied
    bw = load_gray(_png(gray > 128))[0]
    assert set(np.unique(bw)) <= {0, 255}


def test_sixteen_bit_scales_by_bit_depth_without_clipping():
    gray = _xray()
    wide = gray.astype(np.uint16) * 257  # the usual 8 -> 16 bit expansion
    wide[0, 0] = 65535
    decoded, _ = load_gray(_png(wide))
    assert Image.open(io.BytesIO(_png(wide))).mode.startswith("I")
    assert decoded[0, 0] == 255  # top of the range is white, not clipped early
    np.testing.assert_array_equal(decoded[1:], gray[1:])
    dark = np.full((8, 8), 4096, np.uint16)  # 4096 / 65536 of full scale
    assert load_gray(_png(dark))[0][0, 0] == 16
    buf = io.BytesIO()
    Image.fromarray(wide.astype(np.int32), mode="I").save(buf, "TIFF")
    assert load_gray(buf.getvalue())[0][0, 0] == 255


def test_jpeg_input(tmp_path):
    gray = _xray(128, 128)
    path = tmp_path / "a.jpg"
    Image.fromarray(np.stack([gray] * 3, -1)).save(path, "JPEG", quality=95)
    out, orig = load_and_resize(path, [16, 64, 128])
    assert orig == (128, 128)
    ref = Image.open(path).convert("L")
    for s in (16, 64, 128):
        assert out[s].shape == (s, s)
        assert np.abs(out[s] - _reference(ref, s)).mean() < 3.0
    # a size's pixels do not depend on which other sizes were asked for
    np.testing.assert_array_equal(preprocess(path, [16])[16], out[16])


def test_non_square_is_padded_centred_with_black():
    tall = np.full((60, 30), 200, np.uint8)
    square = pad_square(tall)
    assert square.shape == (60, 60)
    assert square[:, :15].max() == 0 and square[:, 45:].max() == 0 and square[:, 15:45].min() == 200
    out = resize_gray(tall, 20)
    ref = ImageOps.pad(Image.fromarray(tall), (60, 60), color=0, centering=(0.5, 0.5))
    assert np.abs(out - _reference(ref, 20)).mean() < 3.0
    assert out[10, 0] < 10 and out[10, 10] > 190  # black sides, bright centre


def test_upscale_and_same_size():
    gray = _xray(16, 16)
    np.testing.assert_array_equal(resize_gray(gray, 16), gray)
    assert resize_gray(gray, 40).shape == (40, 40)
    with pytest.raises(ValueError):
        resize_gray(gray.astype(np.float32), 8)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"this is not an image at all" * 10), "not a recognised image"),
        (lambda p: p.write_bytes(_png(_xray())[:400]), "cannot decode"),
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "folder"),
    ],
    ids=["zero-byte", "garbage", "truncated", "missing", "folder"],
)
def test_bad_files_raise_image_error_with_reason(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError) as info:
        preprocess(path, [8])
    assert reason in info.value.message
    assert isinstance(info.value, CxrflowError) and info.value.path == str(path)


def test_corrupt_png_body_and_float_mode():
    data = bytearray(_png(_xray()))
    data[200:260] = bytes(60)  # damage compressed data inside IDAT
    with pytest.raises(ImageError, match="cannot decode"):
        load_gray(bytes(data))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.float32), mode="F").save(buf, "TIFF")
    with pytest.raises(ImageError, match="unsupported image mode 'F'"):
        load_gray(buf.getvalue())


def test_pillow_keeps_freed_blocks_and_a_larger_setting_stays():
    from cxrflow.data import imaging

    assert Image.core.get_blocks_max() >= imaging.PILLOW_BLOCKS
    before = Image.core.get_blocks_max()
    try:
        Image.core.set_blocks_max(imaging.PILLOW_BLOCKS + 7)
        imaging._keep_pillow_blocks()
        assert Image.core.get_blocks_max() == imaging.PILLOW_BLOCKS + 7
        Image.core.set_blocks_max(0)
        imaging._keep_pillow_blocks()
        assert Image.core.get_blocks_max() == imaging.PILLOW_BLOCKS
    finally:
        Image.core.set_blocks_max(before)
