"""Image decoding for image tasks: format sniffing, safe opening, EXIF orientation, resize and
normalization.

Shared by preprocess (serving) and the digits builder (training), so a model is trained on
exactly the pixels it is served. Pixel counts are checked from the headers before any pixel is
decoded, so a decompression bomb costs a header parse, not gigabytes of memory.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.catalog import ImageSpec
from services.common.errors import ErrorCode, MeshError, invalid

# Magic bytes -> Pillow format name. HF clients send raw bytes with no Content-Type, so the format
# is sniffed; only the decoders in FORMATS are allowed.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
# Pixels one request may decode in all (four images at the default per-image cap of 4096 x 4096):
# what an 8-bit RGB decode of them takes is ~200 MB, and decoding is the costly step. Without it,
# sixteen images just under the per-image cap (`ImageSpec.max_pixels`) would decode to gigabytes.
# `check_sizes` applies both caps from the headers; the gateway runs it before admission and
# preprocess again before decoding.
MAX_REQUEST_PIXELS = 4 * 4096 * 4096
# Per image, for models without an `ImageSpec` (their folder's image processor sizes the pixels).
DEFAULT_MAX_PIXELS: int = ImageSpec.model_fields["max_pixels"].default
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def _unsupported(field: str) -> MeshError:
    return MeshError(
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        f"`{field}` is not a supported image: send PNG, JPEG, GIF, WebP or BMP bytes",
        param=field,
    )


def _too_many_pixels(field: str, width: int, height: int, cap: int) -> MeshError:
    return MeshError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"`{field}` is {width}x{height} pixels; this model takes at most {cap} pixels per image",
        param=field,
    )


def header_size(data: bytes, *, field: str = "inputs") -> tuple[int, int]:
    """(width, height) from the image's header, decoding no pixel (Image.open is lazy); refuses
    unsupported formats and headers Pillow cannot read."""
    fmt = sniff_format(data)
    if fmt is None:
        raise _unsupported(field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the caller compares sizes
            with Image.open(io.BytesIO(data), formats=[fmt]) as image:
                return image.size
    except Image.DecompressionBombError:
        raise MeshError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"`{field}` decodes to too many pixels (decompression bomb)", param=field
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise invalid(f"`{field}` is a corrupt or truncated {fmt} image ({type(exc).__name__})", param=field) from None


def check_sizes(data: Sequence[bytes], spec: ImageSpec | None, *, field: str = "inputs") -> int:
    """Refuse, from the headers alone, a request whose images are over `spec.max_pixels` each or
    over `MAX_REQUEST_PIXELS` (at least `spec.max_pixels`) in all; returns the total pixels. No spec
    (a model with its own image processor): the default per-image cap."""
    max_pixels = spec.max_pixels if spec is not None else DEFAULT_MAX_PIXELS
    per_request = max(MAX_REQUEST_PIXELS, max_pixels)
    total = 0
    for i, raw in enumerate(data):
        where = field if len(data) == 1 else f"{field}[{i}]"
        width, height = header_size(raw, field=where)
        if width * height > max_pixels:
            raise _too_many_pixels(where, width, height, max_pixels)
        total += width * height
        if total > per_request:
            raise MeshError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"`{field}` has more than {per_request} pixels in all (over {i + 1} images); "
                f"the limit is {per_request} pixels per request",
                param=field,
            )
    return total


def open_image(data: bytes, spec: ImageSpec, *, field: str = "inputs") -> Image.Image:
    """Open and fully decode one image, refusing unsupported formats, corrupt data and images
    over `spec.max_pixels` (checked before decoding). A JPEG is decoded at a reduced scale when
    the model's size allows it (the resize in `to_pixels` follows)."""
    return _decoded(data, spec.max_pixels, field=field, draft=(spec.mode, (spec.width, spec.height)))


def load_oriented(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, field: str = "inputs") -> Image.Image:
    """Bytes -> what `transformers.image_utils.load_image` makes of them, decoded as safely as
    `open_image` (no reduced-scale JPEG decode: the model's image processor resizes): turned upright
    by its EXIF orientation tag (`ImageOps.exif_transpose`), then converted to RGB."""
    image = _decoded(data, max_pixels, field=field, draft=None)
    try:
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, TypeError, KeyError) as exc:  # a malformed EXIF block
        raise invalid(f"`{field}` has unreadable EXIF data ({type(exc).__name__})", param=field) from None


def _decoded(data: bytes, max_pixels: int, *, field: str, draft: tuple[str, tuple[int, int]] | None) -> Image.Image:
    """Decode one image: sniffed format only, pixel cap from the header, Pillow's bomb check."""
    fmt = sniff_format(data)
    if fmt is None:
        raise _unsupported(field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > max_pixels:
                raise _too_many_pixels(field, width, height, max_pixels)
            if fmt == "JPEG" and draft is not None:
                # Let the JPEG decoder scale down by up to 8x while decoding: far less work for
                # large photos, same result after the resize to the model's size.
                image.draft(*draft)
            image.load()
    except MeshError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MeshError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"`{field}` decodes to too many pixels (decompression bomb)", param=field
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        # Truncated or corrupt files surface as OSError/SyntaxError from the decoders.
        raise invalid(f"`{field}` is a corrupt or truncated {fmt} image ({type(exc).__name__})", param=field) from None
    return image


def to_pixels(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """[channels, height, width] float32: converted to the model's mode, resized, scaled to
    [0, 1] and normalized per channel with the catalog's mean and std."""
    if image.mode in ("RGBA", "LA", "P") and spec.mode == "RGB":
        # Transparent pixels become white, as browsers and PIL-based pipelines show them.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = background
    image = image.convert(spec.mode)
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), _RESAMPLE[spec.resample])
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return (pixels - mean) / std


def decode(data: bytes, spec: ImageSpec, *, field: str = "inputs") -> np.ndarray:
    """Bytes -> the model's normalized pixel array (see `open_image`, `to_pixels`)."""
    return to_pixels(open_image(data, spec, field=field), spec)
