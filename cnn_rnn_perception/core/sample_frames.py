"""
Deterministic camera-like frames for demos, benchmarks, self-checks and tests; no downloads.

Each frame has a floor, a far wall and two side walls in perspective, plus a box and noise,
so image statistics resemble a robot's camera more than white noise does.
"""

from __future__ import annotations

import cv2
import numpy as np

# Scene classes a navigation stack acts on; the default labels of the node and the demo.
NAVIGATION_LABELS = ['corridor', 'open_space', 'doorway_left', 'doorway_right', 'junction',
                     'blocked']


def camera_frame(height: int = 480, width: int = 640, *, seed: int = 0) -> np.ndarray:
    """Return one BGR uint8 frame of a corridor-like scene, the same for the same seed."""
    rng = np.random.default_rng(seed)
    frame = np.empty((height, width, 3), dtype=np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.55))
    frame[:horizon] = rng.integers(120, 220, 3)            # far wall and ceiling
    frame[horizon:] = rng.integers(40, 120, 3)             # floor
    centre = width * rng.uniform(0.3, 0.7)
    for side in (0, width - 1):                           # side walls, converging on the centre
        wall = np.array([[side, 0], [centre, horizon * 0.8], [centre, horizon * 1.1],
                         [side, height - 1]], dtype=np.int32)
        cv2.fillConvexPoly(frame, wall, rng.integers(60, 200, 3).tolist())
    top = int(rng.uniform(horizon, height * 0.8))
    left = int(rng.uniform(0, width * 0.7))
    cv2.rectangle(frame, (left, top), (left + width // 6, top + height // 6),
                  rng.integers(0, 256, 3).tolist(), thickness=-1)
    noise = rng.normal(0.0, 6.0, frame.shape)
    return np.clip(frame + noise, 0, 255).astype(np.uint8)


def camera_frames(count: int, height: int = 480, width: int = 640, *,
                  seed: int = 0) -> list[np.ndarray]:
    """Return ``count`` different frames, deterministic in ``seed``."""
    return [camera_frame(height, width, seed=seed + index) for index in range(count)]


def selftest_frames(count: int = 8) -> tuple[list[np.ndarray], list[str]]:
    """Return frames of mixed sizes, channel counts and colour orders, deterministic."""
    shapes = [(480, 640, 3, 'bgr'), (240, 320, 3, 'rgb'), (720, 1280, 4, 'bgr'),
              (120, 160, 1, 'rgb'), (480, 640, 4, 'rgb'), (96, 128, 3, 'bgr')]
    frames, orders = [], []
    for index in range(count):
        height, width, channels, order = shapes[index % len(shapes)]
        frame = camera_frame(height, width, seed=100 + index)
        if channels == 1:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)[:, :, None]
        elif channels == 4:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2BGRA)
        if order == 'rgb' and channels != 1:
            frame = np.ascontiguousarray(frame[..., [2, 1, 0, *range(3, channels)]])
        frames.append(frame)
        orders.append(order)
    return frames, orders
