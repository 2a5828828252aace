"""
ROS image messages to frames the engine takes: uint8 HxWxC numpy arrays and a colour order.

Row padding (``step``) and byte order are handled here, because cv_bridge gets both wrong under
NumPy 2 and rosbags-image ignores ``step``. Only the encodings that need real colour work
(Bayer, YUV) go through a converter: cv_bridge where it is installed (a ROS install),
rosbags-image otherwise. Works on rclpy messages and on rosbags messages alike: only field
names are read.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import cv2
import numpy as np

_LOG = logging.getLogger(__name__)

# Encodings the engine takes as they are: (channels, dtype, colour order).
_DIRECT = {
    'rgb8': (3, np.uint8, 'rgb'), 'bgr8': (3, np.uint8, 'bgr'), '8UC3': (3, np.uint8, 'bgr'),
    'rgba8': (4, np.uint8, 'rgb'), 'bgra8': (4, np.uint8, 'bgr'), '8UC4': (4, np.uint8, 'bgr'),
    'mono8': (1, np.uint8, 'rgb'), '8UC1': (1, np.uint8, 'rgb'),
}
# 16-bit single channel: mono16 is intensity (top 8 bits kept); 16UC1 is usually depth in
# millimetres, so each frame is scaled from its own range to 0-255.
_SIXTEEN_BIT = {'mono16': (1, np.uint16, 'rgb'), '16UC1': (1, np.uint16, 'rgb')}
# Encodings that need a colour conversion to bgr8.
_CONVERTED = {
    'bayer_rggb8': (1, np.uint8), 'bayer_bggr8': (1, np.uint8),
    'bayer_gbrg8': (1, np.uint8), 'bayer_grbg8': (1, np.uint8),
    'yuv422': (2, np.uint8), 'uyvy': (2, np.uint8),
    'yuv422_yuy2': (2, np.uint8), 'yuyv': (2, np.uint8),
}
SUPPORTED_ENCODINGS = tuple(sorted({**_DIRECT, **_SIXTEEN_BIT, **_CONVERTED}))
COMPRESSED_FORMATS = ('jpeg', 'png')


class ImageRejected(ValueError):
    """A frame that cannot be classified; the message says why, for counters and logs."""


def _load_converter() -> tuple[str, Callable[[np.ndarray, str], np.ndarray]]:
    try:
        from cv_bridge.boost.cv_bridge_boost import cvtColor2
        return 'cv_bridge', lambda image, encoding: cvtColor2(image, encoding, 'bgr8')
    except ImportError:
        from rosbags.image.image import convert_color
        return 'rosbags-image', lambda image, encoding: convert_color(image, encoding, 'bgr8')


_CONVERTER: tuple[str, Callable[[np.ndarray, str], np.ndarray]] | None = None


def converter_name() -> str:
    """Return which library converts Bayer and YUV images ('cv_bridge' or 'rosbags-image')."""
    return _converter()[0]


def _converter() -> tuple[str, Callable[[np.ndarray, str], np.ndarray]]:
    global _CONVERTER
    if _CONVERTER is None:
        _CONVERTER = _load_converter()
        if _CONVERTER[0] == 'cv_bridge':
            _LOG.info('image conversion: cv_bridge for Bayer and YUV encodings')
        else:
            _LOG.info('image conversion: cv_bridge is not installed, using rosbags-image '
                      'for Bayer and YUV encodings')
    return _CONVERTER


def _packed_pixels(msg: Any, channels: int, dtype: type) -> np.ndarray:
    """Return the pixels as an HxWxC native-endian array, dropping row padding."""
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height == 0 or width == 0:
        raise ImageRejected(f'zero-size image ({width}x{height})')
    itemsize = np.dtype(dtype).itemsize
    row_bytes = width * channels * itemsize
    if step < row_bytes:
        raise ImageRejected(f'step {step} is less than width x bytes per pixel = {row_bytes} '
                            f'for {msg.encoding} at width {width}')
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size < step * height:
        raise ImageRejected(f'truncated image: {data.size} bytes, expected step x height = '
                            f'{step} x {height} = {step * height}')
    rows = data[:step * height].reshape(height, step)[:, :row_bytes]
    if itemsize > 1:
        wire_order = np.dtype(dtype).newbyteorder('>' if msg.is_bigendian else '<')
        # astype to the native dtype swaps bytes only where the wire order differs.
        rows = np.ascontiguousarray(rows).view(wire_order).astype(dtype, copy=False)
    return rows.reshape(height, width, channels)


def scale_to_8_bits(pixels: np.ndarray) -> np.ndarray:
    """
    Scale a 16-bit frame from its own range to 0-255, as cv_bridge's dynamic scaling does.

    Its minimum maps to 0 and its maximum to 255, rounded to nearest (OpenCV's convertTo
    arithmetic); a homogeneous frame is scaled as the range [0, 2], as cv_bridge does.
    """
    low, high = float(pixels.min()), float(pixels.max())
    if low == high:
        low, high = 0.0, 2.0
    alpha = 255.0 / (high - low)
    scaled = cv2.convertScaleAbs(pixels, alpha=alpha, beta=-low * alpha)
    return scaled.reshape(pixels.shape)


def image_to_frame(msg: Any) -> tuple[np.ndarray, str]:
    """Convert a sensor_msgs/Image into (uint8 HxWxC frame, 'rgb' or 'bgr')."""
    encoding = msg.encoding
    if encoding in _DIRECT:
        channels, dtype, order = _DIRECT[encoding]
        return _packed_pixels(msg, channels, dtype), order
    if encoding in _SIXTEEN_BIT:
        pixels = _packed_pixels(msg, 1, np.uint16)
        if encoding == 'mono16':
            return (pixels >> 8).astype(np.uint8), 'rgb'
        return scale_to_8_bits(pixels), 'rgb'
    if encoding in _CONVERTED:
        channels, dtype = _CONVERTED[encoding]
        pixels = _packed_pixels(msg, channels, dtype)
        source = pixels[:, :, 0] if channels == 1 else pixels
        try:
            return np.ascontiguousarray(_converter()[1](source, encoding)), 'bgr'
        except Exception as error:  # the converters raise their own error types
            raise ImageRejected(f'cannot convert {encoding}: {error}') from error
    raise ImageRejected(f'unsupported encoding {encoding!r}; supported: '
                        f'{", ".join(SUPPORTED_ENCODINGS)}')


def compressed_to_frame(msg: Any) -> tuple[np.ndarray, str]:
    """Decode a sensor_msgs/CompressedImage (JPEG or PNG) into (uint8 HxWx3 frame, 'bgr')."""
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise ImageRejected('empty compressed image')
    frame = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if frame is None:
        raise ImageRejected(f'cannot decode compressed image (format {msg.format!r}); '
                            f'expected one of {", ".join(COMPRESSED_FORMATS)}')
    return frame, 'bgr'


def annotated_bgr(frame: np.ndarray, color_order: str, lines: list[str]) -> np.ndarray:
    """Return a decoded frame as a new BGR picture with ``lines`` of text drawn at its top."""
    if frame.ndim == 2 or frame.shape[2] == 1:
        canvas = cv2.cvtColor(frame.reshape(frame.shape[:2]), cv2.COLOR_GRAY2BGR)
    else:
        canvas = frame[..., :3] if color_order == 'bgr' else frame[..., 2::-1]
        canvas = np.ascontiguousarray(canvas).copy()
    scale = max(canvas.shape[0] / 480.0, 0.4)
    step = int(22 * scale) + 4
    cv2.rectangle(canvas, (0, 0), (canvas.shape[1], step * len(lines) + 6), (0, 0, 0), -1)
    for row, text in enumerate(lines):
        cv2.putText(canvas, text, (6, step * (row + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale,
                    (255, 255, 255), max(int(scale), 1), cv2.LINE_AA)
    return canvas


def message_to_frame(msg: Any) -> tuple[np.ndarray, str]:
    """Convert an Image or CompressedImage message; raises ImageRejected with the reason."""
    if hasattr(msg, 'encoding'):
        return image_to_frame(msg)
    return compressed_to_frame(msg)
