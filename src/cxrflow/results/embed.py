"""Images as ``data:`` URIs, so that a page carries its figures inside it (no files beside it, no network).

Figures are downscaled to a width a page shows and re-encoded as palette PNGs, which keeps a study of
many runs to a few megabytes.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrflow import safeio

#: Widest figure embedded, in pixels: a page column at print resolution.
FIGURE_MAX_WIDTH = 1100


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as PNG; colour images as 256-colour palette PNGs (plots: a third of the size, fast to encode)."""
    out = io.BytesIO()
    if image.mode not in ("L", "P", "1"):
        image = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    image.save(out, format="PNG")
    return out.getvalue()


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI of PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_uri(path: str | os.PathLike, max_width: int = FIGURE_MAX_WIDTH) -> str:
    """The PNG (or any image Pillow reads) at ``path``, downscaled to ``max_width``, as a data URI.

    Raises OSError or ValueError when the file is missing or not a readable image; callers show
    that instead of the figure.
    """
    try:
        with safeio.open_regular(path, "figure", safeio.IMAGE_BYTES) as f, Image.open(f) as img:
            img.load()
            image = (
                img.convert("RGBA" if "A" in img.getbands() else "RGB") if img.mode not in ("L", "RGB") else img.copy()
            )
    except UnidentifiedImageError as exc:
        raise ValueError(f"not an image Pillow can read ({exc})") from None
    except (SyntaxError, Image.DecompressionBombError) as exc:  # Pillow reports a broken PNG as SyntaxError
        raise ValueError(f"broken image ({exc})") from None
    if image.width > max_width:
        image = image.resize((max_width, round(image.height * max_width / image.width)), Image.Resampling.LANCZOS)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        image = background
    return data_uri(png_bytes(image))


def array_uri(pixels: np.ndarray, max_side: int | None = None) -> str:
    """A uint8 gray ``[H, W]`` or RGB ``[H, W, 3]`` array as a PNG data URI, shrunk to ``max_side``."""
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
        )
    return data_uri(png_bytes(image))
