"""
Synthetic navigation scenes: procedurally drawn camera frames of the classes a robot acts on.

Every frame is a room seen in perspective (floor, ceiling, side walls, far wall) with surface
textures, a lighting gradient, sensor noise, blur and a little camera roll and pitch. The
classes differ in geometry, some only by side, so the model has to reason about where things
are: ``doorway_left`` and ``doorway_right`` are mirror images of each other.

Written as an ImageFolder dataset (``train/CLASS/*.png``, ``val/CLASS/*.png``) and as rosbag2
recordings: an image topic at a camera rate with smooth transitions between scenes, a
``std_msgs/String`` label topic and ``sensor_msgs/CameraInfo``. Deterministic by seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cnn_rnn_perception.synthetic import NAVIGATION_LABELS
import cv2
import numpy as np
from tqdm import tqdm

CLASSES = tuple(NAVIGATION_LABELS)


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


def write_image_folder(root: str | Path, *, train_per_class: int, val_per_class: int,
                       seed: int = 0, height: int = 240, width: int = 320,
                       progress: bool = True) -> Path:
    """Write ``root/train/CLASS/*.png`` and ``root/val/CLASS/*.png``; return root."""
    root = Path(root)
    for split, per_class, split_seed in (('train', train_per_class, seed),
                                         ('val', val_per_class, seed + 1_000_003)):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True, exist_ok=True)
        total = per_class * len(CLASSES)
        frames = scene_frames(total, seed=split_seed, height=height, width=width)
        for index, (label, frame) in enumerate(tqdm(frames, total=total, desc=f'synth {split}',
                                                    leave=False, disable=not progress)):
            cv2.imwrite(str(root / split / label / f'{index:05d}.png'), frame)
    return root


def _camera_info(bag, stamp_ns: int, height: int, width: int):
    """Return a pinhole CameraInfo with a 90-degree horizontal field of view."""
    types = bag.typestore.types
    focal = width / 2
    return types['sensor_msgs/msg/CameraInfo'](
        header=bag.header(stamp_ns, 'camera'), height=height, width=width,
        distortion_model='plumb_bob', d=np.zeros(5),
        k=np.array([focal, 0, width / 2, 0, focal, height / 2, 0, 0, 1], float),
        r=np.eye(3).reshape(-1),
        p=np.array([focal, 0, width / 2, 0, 0, focal, height / 2, 0, 0, 0, 1, 0], float),
        binning_x=0, binning_y=0,
        roi=types['sensor_msgs/msg/RegionOfInterest'](
            x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def write_recording(path: str | Path, *, scenes: int, seconds_per_scene: float = 2.0,
                    rate_hz: float = 15.0, seed: int = 0, height: int = 240, width: int = 320,
                    topic: str = '/camera/image_raw', label_topic: str = '/scene_label',
                    storage: str = 'sqlite3', progress: bool = True) -> Path:
    """
    Record a drive through ``scenes`` scenes as a rosbag2: frames, labels and CameraInfo.

    The camera moves forward through each scene; between scenes the frames cross-fade over a
    third of a second, and the label switches at the middle of the fade.
    """
    from cnn_rnn_perception.bags import BagWriter

    rng = np.random.default_rng(seed)
    labels = [CLASSES[int(v)] for v in rng.permutation(np.resize(np.arange(len(CLASSES)),
                                                                 scenes))]
    parameters = [draw_parameters(label, rng) for label in labels]
    frames_per_scene = int(round(seconds_per_scene * rate_hz))
    fade = max(int(round(rate_hz / 3)), 1)
    start_ns, period_ns = 1_700_000_000 * 1_000_000_000, int(1e9 / rate_hz)
    path = Path(path)
    info_topic = topic.rsplit('/', 1)[0] + '/camera_info'
    with BagWriter(path, storage=storage) as bag:
        bar = tqdm(total=scenes * frames_per_scene, desc='synth recording', leave=False,
                   disable=not progress)
        written_label = None
        for scene_index, scene in enumerate(parameters):
            for step in range(frames_per_scene):
                stamp = start_ns + (scene_index * frames_per_scene + step) * period_ns
                frame = render(scene, height, width, advance=step / frames_per_scene)
                label = scene.label
                into_fade = step - (frames_per_scene - fade) + 1
                if into_fade > 0 and scene_index + 1 < scenes:
                    weight = into_fade / (fade + 1)
                    following = render(parameters[scene_index + 1], height, width)
                    frame = cv2.addWeighted(frame, 1 - weight, following, weight, 0)
                    if weight >= 0.5:  # the label follows what dominates the picture
                        label = labels[scene_index + 1]
                if label != written_label:
                    bag.write_label(label_topic, label, stamp)
                    written_label = label
                bag.write_image(topic, frame, 'bgr8', stamp, 'camera')
                bag.write_message(info_topic, 'sensor_msgs/msg/CameraInfo', stamp,
                                  _camera_info(bag, stamp, height, width))
                bar.update(1)
        bar.close()
    return path
