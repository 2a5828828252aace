"""
Synthetic navigation scenes: procedurally drawn camera frames of the classes a robot acts on.

Every frame is a room seen in perspective (floor, ceiling, side walls, far wall) with surface
textures, a lighting gradient, sensor noise, blur and a little camera roll and pitch. The
classes differ in geometry, some only by side, so the model has to reason about where things
are: ``doorway_left`` and ``doorway_right`` are mirror images of each other.

Pure drawing: frames and their labels as arrays, no files (``synth`` writes them). Two motion
sources need time to label, for temporal models: ``ego_motion_frames`` (a camera tilted at a
floor under coloured lights, labelled by what the robot does) and ``texture_motion_frames`` (a
camera panning, zooming or still over smooth random textures with no large-scale structure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from cnn_rnn_perception.core.sample_frames import NAVIGATION_LABELS
import cv2
import numpy as np

CLASSES = tuple(NAVIGATION_LABELS)
MOTIONS = ('forward', 'turning_left', 'turning_right', 'stopped')


@dataclass(frozen=True)
class SceneParameters:
    """Everything random about one scene, drawn once, so a recording can move through it."""

    label: str
    vanishing_x: float      # fraction of the width
    horizon: float          # fraction of the height
    far_half_width: float   # far wall half-width, fraction of the width
    far_half_height: float
    colours: tuple          # floor, ceiling, left wall, right wall, far wall, feature
    texture_seed: int
    light_angle: float
    light_strength: float
    feature_depth: float    # where a doorway or obstacle sits, 0 near ... 1 far
    roll_deg: float
    noise: float
    blur: int


def draw_parameters(label: str, rng: np.random.Generator) -> SceneParameters:
    """Draw a random scene of one class."""
    if label not in CLASSES:
        raise ValueError(f'unknown scene class {label!r}; classes: {", ".join(CLASSES)}')
    wall = rng.integers(90, 210, 3)
    colours = (tuple(int(v) for v in rng.integers(30, 120, 3)),            # floor
               tuple(int(v) for v in rng.integers(150, 240, 3)),           # ceiling
               tuple(int(v) for v in np.clip(wall + rng.integers(-25, 25, 3), 0, 255)),
               tuple(int(v) for v in np.clip(wall + rng.integers(-25, 25, 3), 0, 255)),
               tuple(int(v) for v in rng.integers(60, 220, 3)),            # far wall
               tuple(int(v) for v in rng.integers(0, 80, 3)))              # doorway / obstacle
    open_space = label == 'open_space'
    return SceneParameters(
        label=label, vanishing_x=float(rng.uniform(0.42, 0.58)),
        horizon=float(rng.uniform(0.4, 0.55)),
        far_half_width=float(rng.uniform(0.35, 0.48) if open_space else rng.uniform(0.07, 0.14)),
        far_half_height=float(rng.uniform(0.05, 0.1) if open_space else rng.uniform(0.08, 0.15)),
        colours=colours, texture_seed=int(rng.integers(0, 2**31)),
        light_angle=float(rng.uniform(0, 2 * np.pi)), light_strength=float(rng.uniform(0.1, 0.4)),
        feature_depth=float(rng.uniform(0.25, 0.6)), roll_deg=float(rng.uniform(-6, 6)),
        noise=float(rng.uniform(2, 9)), blur=int(rng.choice([0, 0, 3, 5])))


def _lerp(a, b, t: float) -> np.ndarray:
    return np.asarray(a, float) + (np.asarray(b, float) - np.asarray(a, float)) * t


def _textured(frame: np.ndarray, polygon: np.ndarray, colour: tuple, rng: np.random.Generator,
              stripes: bool) -> None:
    """Fill a polygon with a colour, a random texture and (for floors) receding stripes."""
    mask = np.zeros(frame.shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, polygon.astype(np.int32), 255)
    texture = rng.normal(0, 10, frame.shape[:2])
    if stripes:
        rows = np.arange(frame.shape[0])[:, None]
        texture += 12 * np.sin(rows * rng.uniform(0.15, 0.4))
    surface = np.clip(np.asarray(colour, float)[None, None, :] + texture[..., None], 0, 255)
    frame[mask > 0] = surface[mask > 0]


def render(scene: SceneParameters, height: int = 240, width: int = 320, *,
           advance: float = 0.0) -> np.ndarray:
    """
    Draw a scene as a BGR uint8 frame; ``advance`` (0..1) moves the camera forward.

    Moving forward brings the far wall and any doorway or obstacle closer, so a recording
    can travel smoothly through a scene.
    """
    rng = np.random.default_rng(scene.texture_seed)
    frame = np.zeros((height, width, 3), np.uint8)
    vx, vy = scene.vanishing_x * width, scene.horizon * height
    grow = 1.0 + 0.6 * advance
    half_w = scene.far_half_width * width * grow
    half_h = scene.far_half_height * height * grow
    far = np.array([[vx - half_w, vy - half_h], [vx + half_w, vy - half_h],
                    [vx + half_w, vy + half_h], [vx - half_w, vy + half_h]])
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], float)
    floor, ceiling, left, right, far_colour, feature = scene.colours
    _textured(frame, np.array([corners[0], corners[1], far[1], far[0]]), ceiling, rng, False)
    _textured(frame, np.array([far[3], far[2], corners[2], corners[3]]), floor, rng, True)
    if scene.label == 'open_space':
        _textured(frame, np.array([corners[0], far[0], far[3], corners[3]]), floor, rng, True)
        _textured(frame, np.array([far[1], corners[1], corners[2], far[2]]), floor, rng, True)
    else:
        _textured(frame, np.array([corners[0], far[0], far[3], corners[3]]), left, rng, False)
        _textured(frame, np.array([far[1], corners[1], corners[2], far[2]]), right, rng, False)
    _textured(frame, far, far_colour, rng, False)

    def wall_opening(side: str, depth: float, span: float, tall: float) -> np.ndarray:
        """Return a quad on a side wall between two depths (0 = camera, 1 = far wall)."""
        near_depth, far_depth = max(depth - span / 2, 0.0), min(depth + span / 2, 0.95)
        image_edge, far_edge = (corners[0], far[0]) if side == 'left' else (corners[1], far[1])
        image_bottom, far_bottom = (corners[3], far[3]) if side == 'left' else (corners[2], far[2])
        top_near, top_far = _lerp(image_edge, far_edge, near_depth), _lerp(image_edge, far_edge,
                                                                           far_depth)
        bottom_near = _lerp(image_bottom, far_bottom, near_depth)
        bottom_far = _lerp(image_bottom, far_bottom, far_depth)
        top_near = _lerp(bottom_near, top_near, tall)
        top_far = _lerp(bottom_far, top_far, tall)
        return np.array([top_near, top_far, bottom_far, bottom_near])

    depth = min(scene.feature_depth + 0.5 * advance, 0.85)
    if scene.label in ('doorway_left', 'doorway_right'):
        side = 'left' if scene.label == 'doorway_left' else 'right'
        cv2.fillConvexPoly(frame, wall_opening(side, depth, 0.3, 0.8).astype(np.int32), feature)
    elif scene.label == 'junction':
        for side in ('left', 'right'):
            cv2.fillConvexPoly(frame, wall_opening(side, 0.75, 0.4, 1.0).astype(np.int32),
                               feature)
    elif scene.label == 'blocked':
        size = (0.25 + 0.35 * (1 - depth)) * grow
        cx, bottom = vx, vy + (height - vy) * (0.55 + 0.3 * (1 - depth))
        box = np.array([[cx - size * width / 2, bottom - size * height * 0.9],
                        [cx + size * width / 2, bottom - size * height * 0.9],
                        [cx + size * width / 2, bottom], [cx - size * width / 2, bottom]])
        _textured(frame, box, feature, rng, False)

    # Lighting gradient, sensor noise, blur, camera roll.
    rows, columns = np.mgrid[0:height, 0:width]
    light = 1.0 + scene.light_strength * (
        np.cos(scene.light_angle) * (columns / width - 0.5)
        + np.sin(scene.light_angle) * (rows / height - 0.5))
    lit = frame * light[..., None] + rng.normal(0, scene.noise, frame.shape)
    frame = np.clip(lit, 0, 255).astype(np.uint8)
    if scene.blur:
        frame = cv2.GaussianBlur(frame, (scene.blur, scene.blur), 0)
    rotation = cv2.getRotationMatrix2D((width / 2, height / 2), scene.roll_deg, 1.05)
    return cv2.warpAffine(frame, rotation, (width, height), borderMode=cv2.BORDER_REFLECT)


def scene_frames(count: int, *, seed: int, height: int = 240, width: int = 320
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``count`` (label, frame) pairs, classes in turn, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        label = CLASSES[index % len(CLASSES)]
        scene = draw_parameters(label, rng)
        yield label, render(scene, height, width, advance=float(rng.uniform(0, 0.6)))


@dataclass(frozen=True)
class Occluder:
    """A figure crossing the view close to the camera, from ``start`` for ``frames`` frames."""

    start: int
    frames: int
    leftward: bool
    colour: tuple
    width: float   # fraction of the frame width


def draw_occluders(total_frames: int, rate_hz: float, rng: np.random.Generator
                   ) -> list[Occluder]:
    """Figures crossing 0.3 to 1 s each, one every 2 to 5 s on average, never two at once."""
    occluders, frame = [], int(rng.uniform(1.0, 3.0) * rate_hz)
    while frame < total_frames:
        length = max(int(round(rng.uniform(0.3, 1.0) * rate_hz)), 2)
        occluders.append(Occluder(
            start=frame, frames=length, leftward=bool(rng.random() < 0.5),
            colour=tuple(int(v) for v in rng.integers(10, 90, 3)),
            width=float(rng.uniform(0.3, 0.5))))
        frame += length + int(rng.uniform(1.5, 4.5) * rate_hz)
    return occluders


def draw_occluder(frame: np.ndarray, occluder: Occluder, step: int) -> None:
    """Draw a person-like silhouette (body and head) at its place ``step`` frames in."""
    height, width = frame.shape[:2]
    body = occluder.width * width
    progress = (step + 0.5) / occluder.frames
    if occluder.leftward:
        progress = 1.0 - progress
    centre = -body / 2 + progress * (width + body)
    top = 0.22 * height
    cv2.rectangle(frame, (int(centre - body / 2), int(top)), (int(centre + body / 2), height),
                  occluder.colour, -1)
    cv2.circle(frame, (int(centre), int(top)), int(body * 0.3), occluder.colour, -1)


def draw_floor(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """
    Draw a floor under coloured lights, ``height`` x ``width`` BGR, wrapping at its edges.

    The light changes smoothly across the floor (red and blue with x, green and brightness
    with y), and tiles, patches and marks of other shades lie on it, so neighbouring views
    differ a little and distant ones a lot, the way a real floor looks from a moving robot.
    """
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    period = width / 2
    light = np.empty((height, width, 3), np.float32)
    light[..., 0] = 128 + 100 * np.cos(2 * np.pi * columns / period)
    light[..., 1] = 128 + 100 * np.sin(2 * np.pi * rows / (height / 2))
    light[..., 2] = 128 + 100 * np.sin(2 * np.pi * columns / period)
    # Brightness in step with green's quarter-turn: distance along y reads both ways too.
    light *= (1.0 + 0.3 * np.cos(2 * np.pi * rows / (height / 2)))[..., None]
    shade = np.ones((height, width), np.float32)
    for _ in range(int(height * width / 1500)):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(4, 16))
        value = float(rng.uniform(0.75, 1.1))
        if rng.random() < 0.5:
            cv2.circle(shade, (x, y), size, value, -1)
        else:
            cv2.rectangle(shade, (x - size, y - size // 2), (x + size, y + size // 2), value, -1)
    return np.clip(light * shade[..., None], 0, 255).astype(np.uint8)


def _view(floor: np.ndarray, x: float, y: float, height: int, width: int) -> np.ndarray:
    rows = (np.arange(height) + int(round(y))) % floor.shape[0]
    columns = (np.arange(width) + int(round(x))) % floor.shape[1]
    return floor[rows][:, columns]


# How the floor moves in the image, per unit of speed: moving forward the floor flows down
# the image (toward the camera); turning left it flows right, turning right it flows left.
_FLOW = {'forward': (0.0, -1.0), 'turning_left': (-1.0, 0.0), 'turning_right': (1.0, 0.0),
         'stopped': (0.0, 0.0)}


def ego_motion_frames(seconds: float, *, rate_hz: float = 15.0, seed: int = 0,
                      height: int = 96, width: int = 128,
                      segment_s: tuple[float, float] = (2.0, 4.0)
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """
    Yield (motion, frame) pairs of one drive: segments of one motion each, 2 to 4 s long.

    The view moves 4 to 8% of the frame width per frame (at 15 Hz, a brisk turn), with a
    little jitter; each frame has its own sensor noise. Deterministic by seed.
    """
    rng = np.random.default_rng(seed)
    floor = draw_floor(rng, height * 4, width * 4)
    x, y = rng.uniform(0, width * 4), rng.uniform(0, height * 4)
    remaining = int(round(seconds * rate_hz))
    while remaining > 0:
        motion = MOTIONS[int(rng.integers(0, len(MOTIONS)))]
        count = min(int(rng.uniform(*segment_s) * rate_hz), remaining)
        speed = rng.uniform(0.04, 0.08) * width
        flow_x, flow_y = _FLOW[motion]
        for _ in range(count):
            x += flow_x * speed + rng.normal(0, 0.3)
            y += flow_y * speed + rng.normal(0, 0.3)
            noisy = _view(floor, x, y, height, width) + rng.normal(0, 4, (height, width, 3))
            yield motion, np.clip(noisy, 0, 255).astype(np.uint8)
        remaining -= count


CAMERA_MOTIONS = ('pan_left', 'pan_right', 'zoom_in', 'still')


def draw_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """
    Draw a smooth random texture, ``size`` x ``size`` BGR, that wraps at its edges.

    Blurred noise at one small scale (a few pixels), in three channels of their own: there
    is no large-scale structure (no gradient of light or colour across it), so where the camera
    looks tells nothing, and a moving view is told apart only by how it changes.
    """
    sigma = float(rng.uniform(1.5, 3.0))
    noise = rng.normal(0.0, 1.0, (size, size, 3)).astype(np.float32)
    margin = int(4 * sigma) + 1  # blurred with its wrapped-around neighbours: seamless
    padded = np.pad(noise, ((margin, margin), (margin, margin), (0, 0)), mode='wrap')
    smooth = cv2.GaussianBlur(padded, (0, 0), sigma)[margin:-margin, margin:-margin]
    smooth /= smooth.std(axis=(0, 1), keepdims=True)
    mixed = smooth @ rng.uniform(0.3, 1.0, (3, 3)).astype(np.float32)
    mixed = (mixed - mixed.mean()) / mixed.std()
    return np.clip(128 + 45 * mixed, 0, 255).astype(np.uint8)


def texture_motion_frames(segments: int, *, rate_hz: float = 15.0, seed: int = 0,
                          size: int = 96, segment_s: tuple[float, float] = (1.5, 3.0)
                          ) -> Iterator[tuple[str, np.ndarray]]:
    """
    Yield (motion, frame) pairs: a camera over a smooth random texture, one motion a segment.

    ``pan_left`` and ``pan_right`` move the view 0.7 to 3 pixels a frame, ``zoom_in`` grows it
    1 to 3% a frame, ``still`` only jitters. Every segment shows a new texture from a new
    place and scale (0.7 to 1.0), so neither tells the motion. Sensor noise on every frame.
    Deterministic by seed.
    """
    rng = np.random.default_rng(seed)
    for _ in range(segments):
        texture = draw_texture(rng, size * 4)  # a new surface: grain and colours of its own
        motion = CAMERA_MOTIONS[int(rng.integers(0, len(CAMERA_MOTIONS)))]
        count = int(rng.uniform(*segment_s) * rate_hz)
        x, y = rng.uniform(0, texture.shape[1], 2)
        scale = float(rng.uniform(0.7, 1.0))
        speed = float(rng.uniform(0.7, 3.0))
        growth = float(rng.uniform(0.01, 0.03))
        for _ in range(count):
            if motion == 'pan_left':
                x -= speed / scale  # the camera turns left: the texture flows right
            elif motion == 'pan_right':
                x += speed / scale
            elif motion == 'zoom_in':
                scale *= 1.0 + growth
            x, y = x + rng.normal(0, 0.15), y + rng.normal(0, 0.15)
            # Output pixel (u, v) shows texture point (x, y) + ((u, v) - centre) / scale.
            view = np.float32([[1 / scale, 0, x - size / 2 / scale],
                               [0, 1 / scale, y - size / 2 / scale]])
            frame = cv2.warpAffine(texture, view, (size, size),
                                   flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_WRAP)
            noisy = frame + rng.normal(0, 3, frame.shape)
            yield motion, np.clip(noisy, 0, 255).astype(np.uint8)
