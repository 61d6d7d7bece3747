"""The one way this project reads an image: training, evaluation, prediction, drawings, the
pseudo-label export and its check all call :func:`read_image` or :func:`image_size`.

EXIF orientation is applied, as OpenCV's ``imread`` (the reference's reader) does: a photo whose
camera stored it sideways with an orientation tag is read upright, and boxes are in the upright
image's pixels. The tag is read by Pillow and applied here for every format, so the size
:func:`image_size` reports from the header is the size :func:`read_image` returns.
"""
from __future__ import annotations

import io
import os

import cv2
import numpy as np
from PIL import Image

from .annotations import DataError

_ORIENTATION_TAG = 0x0112
# EXIF orientations that swap width and height (the transposing ones).
_TRANSPOSED = (5, 6, 7, 8)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):  # a damaged EXIF block: the pixels are still usable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` as EXIF ``orientation`` says it is to be shown (the transforms of Pillow's
    ``ImageOps.exif_transpose``)."""
    if orientation in _TRANSPOSED:
        image = image.transpose(1, 0, 2)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation == 2:
        image = image[:, ::-1]
    elif orientation == 3:
        image = image[::-1, ::-1]
    elif orientation == 4:
        image = image[::-1]
    return np.ascontiguousarray(image)


def read_image(path: str | os.PathLike, where: str = "") -> np.ndarray:
    """The BGR uint8 ``[H, W, 3]`` image at ``path``, EXIF orientation applied. A missing file is a
    ``FileNotFoundError``, one that is no image a :class:`DataError`; both name ``path`` and
    ``where`` (what refers to it, e.g. ``" of entry train[3] (iid 7) in anns.json"``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}{where}")
    data = np.fromfile(path, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is None:
        raise DataError(f"image {path}{where} is not an image OpenCV can decode (JPEG, PNG, BMP, TIFF, WebP...): "
                        "replace the file, or remove what refers to it")
    try:
        with Image.open(io.BytesIO(data.tobytes())) as header:
            orientation = _orientation(header)
    except OSError:  # a format OpenCV decodes and Pillow does not: no orientation tag to apply
        orientation = 1
    return _upright(image, orientation)


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of the image at ``path`` as :func:`read_image` returns it, read from the
    file's header; None when there is no readable image."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = _orientation(image)
    except OSError:
        return None
    return (height, width) if orientation in _TRANSPOSED else (width, height)
