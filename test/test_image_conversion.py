"""ROS image messages to engine frames: encodings, padding, byte order, bad input."""

from cnn_rnn_perception.core.image_conversion import (
    converter_name, ImageRejected, message_to_frame, scale_to_8_bits, SUPPORTED_ENCODINGS)
import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

RNG = np.random.default_rng(0)


def image_msg(pixels: np.ndarray, encoding: str, *, padding: int = 0,
              bigendian: bool = False) -> Image:
    """Build an Image the way a driver would, optionally with padded rows and big-endian."""
    height, width = pixels.shape[:2]
    if pixels.dtype.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder('>' if bigendian else '<'))
    rows = pixels.reshape(height, -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((height, padding), 0xAB, np.uint8)], axis=1)
    return Image(height=height, width=width, encoding=encoding, is_bigendian=int(bigendian),
                 step=padded.shape[1], data=padded.tobytes())


@pytest.mark.parametrize('encoding,channels,order', [
    ('rgb8', 3, 'rgb'), ('bgr8', 3, 'bgr'), ('rgba8', 4, 'rgb'), ('bgra8', 4, 'bgr'),
    ('mono8', 1, 'rgb'), ('8UC3', 3, 'bgr'), ('8UC1', 1, 'rgb'),
])
@pytest.mark.parametrize('padding', [0, 13])
def test_eight_bit_encodings_pass_through_with_padding_removed(encoding, channels, order,
                                                               padding):
    pixels = RNG.integers(0, 256, (5, 7, channels), dtype=np.uint8)
    frame, color_order = message_to_frame(image_msg(pixels, encoding, padding=padding))
    np.testing.assert_array_equal(frame, pixels)
    assert color_order == order


@pytest.mark.parametrize('padding', [0, 6])
def test_sixteen_bit_images_read_the_same_in_either_byte_order(padding):
    pixels = RNG.integers(0, 65536, (4, 6, 1), dtype=np.uint16)
    little, _ = message_to_frame(image_msg(pixels, 'mono16', padding=padding))
    big, _ = message_to_frame(image_msg(pixels, 'mono16', padding=padding, bigendian=True))
    np.testing.assert_array_equal(little, big)
    np.testing.assert_array_equal(little, (pixels >> 8).astype(np.uint8))


def test_16uc1_depth_is_scaled_from_its_own_range():
    depth = np.array([[[500], [1500]], [[2500], [4500]]], dtype=np.uint16)
    frame, _ = message_to_frame(image_msg(depth, '16UC1', bigendian=True))
    assert frame.dtype == np.uint8
    assert frame.min() == 0 and frame.max() == 255
    assert frame[0, 1, 0] == pytest.approx(255 * 1000 / 4000, abs=1)


def uniform_bgr(height=8, width=8, colour=(40, 120, 200)) -> np.ndarray:
    return np.full((height, width, 3), colour, np.uint8)


@pytest.mark.parametrize('encoding,pair', [
    ('yuv422', 'UYVY'), ('uyvy', 'UYVY'), ('yuv422_yuy2', 'YUYV'), ('yuyv', 'YUYV')])
def test_yuv422_in_both_byte_orders_decodes_to_the_colour(encoding, pair):
    bgr = uniform_bgr()
    # BT.601 video range, the convention of YUV 4:2:2 cameras and of the decoders.
    blue, green, red = bgr[0, 0] / 255.0
    y = round(16 + 65.481 * red + 128.553 * green + 24.966 * blue)
    u = round(128 - 37.797 * red - 74.203 * green + 112.0 * blue)
    v = round(128 + 112.0 * red - 93.786 * green - 18.214 * blue)
    quad = [u, y, v, y] if pair == 'UYVY' else [y, u, y, v]
    packed = np.tile(np.array(quad, np.uint8), (8, 4)).reshape(8, 8, 2)
    frame, order = message_to_frame(image_msg(packed, encoding, padding=4))
    assert order == 'bgr' and frame.shape == (8, 8, 3)
    assert np.abs(frame.astype(int) - bgr.astype(int)).max() <= 3


@pytest.mark.parametrize('encoding,layout', [
    ('bayer_rggb8', 'RGGB'), ('bayer_bggr8', 'BGGR'),
    ('bayer_gbrg8', 'GBRG'), ('bayer_grbg8', 'GRBG')])
def test_bayer_mosaics_demosaic_to_the_colour(encoding, layout):
    blue, green, red = 40, 120, 200
    value = {'R': red, 'G': green, 'B': blue}
    tile = np.array([[value[layout[0]], value[layout[1]]],
                     [value[layout[2]], value[layout[3]]]], np.uint8)
    mosaic = np.tile(tile, (4, 4))[:, :, None]
    frame, order = message_to_frame(image_msg(mosaic, encoding))
    assert order == 'bgr'
    centre = frame[2:6, 2:6].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(centre, [blue, green, red], atol=3)


@pytest.mark.parametrize('extension,fmt', [('.jpg', 'jpeg'), ('.png', 'png')])
def test_compressed_images_decode_to_bgr(extension, fmt):
    bgr = uniform_bgr(16, 16)
    ok, encoded = cv2.imencode(extension, bgr)
    frame, order = message_to_frame(CompressedImage(format=fmt, data=encoded.tobytes()))
    assert order == 'bgr' and frame.shape == (16, 16, 3)
    assert np.abs(frame.astype(int) - bgr.astype(int)).max() <= 4


@pytest.mark.parametrize('msg,reason', [
    (Image(height=4, width=4, encoding='rgb8', step=10, data=bytes(40)),
     'step 10 is less than width x bytes per pixel = 12'),
    (Image(height=4, width=4, encoding='rgb8', step=12, data=bytes(30)),
     'truncated image: 30 bytes, expected step x height = 12 x 4 = 48'),
    (Image(height=0, width=4, encoding='rgb8', step=12, data=b''), 'zero-size image (4x0)'),
    (Image(height=2, width=2, encoding='hsv8', step=6, data=bytes(12)),
     "unsupported encoding 'hsv8'; supported: "),
    (CompressedImage(format='jpeg', data=b'\xff\xd8\xff\xe0 not really a jpeg'),
     "cannot decode compressed image (format 'jpeg')"),
    (CompressedImage(format='jpeg', data=b''), 'empty compressed image'),
])
def test_bad_images_are_rejected_with_the_reason(msg, reason):
    with pytest.raises(ImageRejected) as error:
        message_to_frame(msg)
    assert reason in str(error.value)


def test_every_required_encoding_is_supported_and_the_converter_is_named():
    required = {'rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', '16UC1', '8UC3', 'yuv422',
                'yuv422_yuy2', 'bayer_rggb8', 'bayer_bggr8', 'bayer_gbrg8', 'bayer_grbg8'}
    assert required <= set(SUPPORTED_ENCODINGS)
    assert converter_name() in ('cv_bridge', 'rosbags-image')


def test_16uc1_depth_maps_each_frames_range_onto_0_to_255_for_many_ranges():
    rng = np.random.default_rng(7)
    for _ in range(500):
        low = int(rng.integers(0, 60000))
        high = int(rng.integers(low + 1, 65536))
        depth = rng.integers(low, high + 1, (6, 9), dtype=np.uint16)
        depth.flat[0], depth.flat[1] = low, high
        frame = scale_to_8_bits(depth)
        assert frame.dtype == np.uint8 and frame.shape == depth.shape
        assert frame.flat[0] == 0 and frame.flat[1] == 255, (low, high)
        # Monotone, and within half a step of the exact value.
        exact = (depth.astype(np.float64) - low) * 255.0 / (high - low)
        assert np.abs(frame - exact).max() <= 0.5 + 1e-9
    assert scale_to_8_bits(np.full((2, 2), 1, np.uint16)).max() == 128  # cv_bridge: [0, 2]
