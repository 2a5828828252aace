"""
Synthetic navigation scenes: procedurally drawn camera frames of the classes a robot acts on.

Every frame is a room seen in perspective (floor, ceiling, side walls, far wall) with surface
textures, a lighting gradient, sensor noise, blur and a little camera roll and pitch. The
classes differ in geometry, some only by side, so the model has to reason about where things
are: ``doorway_left`` and ``doorway_right`` are mirror images of each other.

Written as an ImageFolder dataset (``train/CLASS/*.png``, ``val/CLASS/*.png``) and as rosbag2
recordings: an image topic at a camera rate with smooth transitions between scenes, a
``std_msgs/String`` label topic and ``sensor_msgs/CameraInfo``. Deterministic by seed.

Two kinds of drive need time to label, for temporal models:

- ``write_recording(..., occluders=True)``: scenes as above, with a figure crossing close to
  the camera now and then (0.3 to 1 s); the scene label does not change while it passes.
- ``write_ego_motion_drive``: a camera tilted at a floor under coloured lights, labelled by what
  the robot does (``forward``, ``turning_left``, ``turning_right``, ``stopped``). Every frame
  is a view of the same floor at some place, so no single frame tells the motion: only how the
  view changes from frame to frame does.
- ``write_texture_motion_drive``: a camera panning, zooming or still over smooth random
  textures with no large-scale structure (no floor, no light gradient), a new texture every
  segment: unlike the drives above, the change of a pooled vector says little here, and only
  a model that compares the pixels of neighbouring frames tells the motion.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from cnn_rnn_perception.tools import options
from cnn_rnn_perception.tools.synthetic.scenes import (
    CLASSES, draw_occluder, draw_occluders, draw_parameters, ego_motion_frames, render,
    scene_frames, texture_motion_frames)
import cv2
import numpy as np
from tqdm import tqdm


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
                    storage: str = 'sqlite3', occluders: bool = False,
                    progress: bool = True) -> Path:
    """
    Record a drive through ``scenes`` scenes as a rosbag2: frames, labels and CameraInfo.

    The camera moves forward through each scene; between scenes the frames cross-fade over a
    third of a second, and the label switches at the middle of the fade. With ``occluders``,
    figures cross the view now and then without changing the label.
    """
    from cnn_rnn_perception.tools.evaluation.bags import BagWriter

    rng = np.random.default_rng(seed)
    labels = [CLASSES[int(v)] for v in rng.permutation(np.resize(np.arange(len(CLASSES)),
                                                                 scenes))]
    parameters = [draw_parameters(label, rng) for label in labels]
    frames_per_scene = int(round(seconds_per_scene * rate_hz))
    crossing = {}
    if occluders:
        for occluder in draw_occluders(scenes * frames_per_scene, rate_hz, rng):
            crossing.update({occluder.start + step: (occluder, step)
                             for step in range(occluder.frames)})
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
                index = scene_index * frames_per_scene + step
                if index in crossing:
                    draw_occluder(frame, *crossing[index])
                if label != written_label:
                    bag.write_label(label_topic, label, stamp)
                    written_label = label
                bag.write_image(topic, frame, 'bgr8', stamp, 'camera')
                bag.write_message(info_topic, 'sensor_msgs/msg/CameraInfo', stamp,
                                  _camera_info(bag, stamp, height, width))
                bar.update(1)
        bar.close()
    return path


def write_ego_motion_drive(path: str | Path, *, seconds: float, rate_hz: float = 15.0,
                           seed: int = 0, height: int = 96, width: int = 128,
                           topic: str = '/camera/image_raw', label_topic: str = '/scene_label',
                           storage: str = 'sqlite3', progress: bool = True) -> Path:
    """Record an ego-motion drive as a rosbag2: frames, motion labels (as scene labels)."""
    frames = ego_motion_frames(seconds, rate_hz=rate_hz, seed=seed, height=height, width=width)
    return write_labelled_frames(path, frames, total=int(round(seconds * rate_hz)),
                                 rate_hz=rate_hz, topic=topic, label_topic=label_topic,
                                 storage=storage, progress=progress)


def write_labelled_frames(path: str | Path, frames: Iterator[tuple[str, np.ndarray]], *,
                          total: int, rate_hz: float, topic: str = '/camera/image_raw',
                          label_topic: str = '/scene_label', storage: str = 'sqlite3',
                          progress: bool = True) -> Path:
    """Record (label, BGR frame) pairs as a rosbag2: frames at ``rate_hz``, label changes."""
    from cnn_rnn_perception.tools.evaluation.bags import BagWriter

    start_ns, period_ns = 1_700_000_000 * 1_000_000_000, int(1e9 / rate_hz)
    path = Path(path)
    with BagWriter(path, storage=storage) as bag:
        written_label = None
        for index, (label, frame) in enumerate(tqdm(frames, total=total, leave=False,
                                                    desc=f'synth {path.name}',
                                                    disable=not progress)):
            stamp = start_ns + index * period_ns
            if label != written_label:
                bag.write_label(label_topic, label, stamp)
                written_label = label
            bag.write_image(topic, frame, 'bgr8', stamp, 'camera')
    return path


def write_texture_motion_drive(path: str | Path, *, segments: int, rate_hz: float = 15.0,
                               seed: int = 0, size: int = 96, storage: str = 'sqlite3',
                               progress: bool = True) -> Path:
    """Record ``texture_motion_frames`` as a rosbag2 with its labels on /scene_label."""
    frames = list(texture_motion_frames(segments, rate_hz=rate_hz, seed=seed, size=size))
    return write_labelled_frames(path, iter(frames), total=len(frames), rate_hz=rate_hz,
                                 storage=storage, progress=progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the synth command's flags."""
    parser.description = (
        'Write OUTPUT/images/{train,val}/CLASS/*.png and OUTPUT/recording_N (rosbag2: '
        '/camera/image_raw, /camera/camera_info and /scene_label) for the classes corridor, '
        'open_space, doorway_left, doorway_right, junction and blocked. Deterministic by '
        '--seed.')
    parser.add_argument('output')
    parser.add_argument('--train-per-class', type=int, default=200)
    parser.add_argument('--val-per-class', type=int, default=40)
    parser.add_argument('--recordings', type=int, default=1)
    drives = ('scenes', 'occluded', 'ego-motion', 'texture-motion')
    parser.add_argument('--drive', choices=drives, default='scenes',
                        help='what the recordings show: scenes (default); occluded: scenes '
                             'with figures crossing close to the camera, the label unchanged; '
                             'ego-motion: a floor seen while moving, labelled forward, '
                             'turning_left, turning_right or stopped, which no single frame '
                             'tells; texture-motion: a square camera (the smaller side of '
                             '--size) panning left or right, zooming in or still over smooth '
                             'random textures, --segments of 1.5-3 s each, a new texture each '
                             '(recordings only)')
    parser.add_argument('--segments', type=int, default=15,
                        help='segments per texture-motion recording (default: 15)')
    parser.add_argument('--scenes', type=int, default=12, help='scenes per recording')
    parser.add_argument('--seconds-per-scene', type=float, default=2.0)
    parser.add_argument('--seconds', type=float, default=60.0,
                        help='length of each ego-motion recording (default: 60)')
    options.add(parser, '--rate', default=15.0, help='recording frame rate in Hz (default: 15)')
    parser.add_argument('--size', type=options.size, default=(320, 240), metavar='WxH')
    parser.add_argument('--storage', choices=('sqlite3', 'mcap'), default='sqlite3')
    options.add(parser, '--seed', '--no-progress')


def main(args: argparse.Namespace) -> int:
    """Draw the images and recordings."""
    width, height = args.size
    progress = not args.no_progress
    if args.drive not in ('ego-motion', 'texture-motion'):
        root = write_image_folder(f'{args.output}/images', train_per_class=args.train_per_class,
                                  val_per_class=args.val_per_class, seed=args.seed,
                                  height=height, width=width, progress=progress)
        print(f'wrote {root}/train and {root}/val')
    for index in range(args.recordings):
        seed = args.seed + 7919 * (index + 1)
        output = f'{args.output}/recording_{index}'
        if args.drive == 'texture-motion':
            path = write_texture_motion_drive(output, segments=args.segments,
                                              rate_hz=args.rate, seed=seed,
                                              size=min(width, height), storage=args.storage,
                                              progress=progress)
        elif args.drive == 'ego-motion':
            path = write_ego_motion_drive(output, seconds=args.seconds, rate_hz=args.rate,
                                          seed=seed, height=height, width=width,
                                          storage=args.storage, progress=progress)
        else:
            path = write_recording(output, scenes=args.scenes, rate_hz=args.rate, seed=seed,
                                   seconds_per_scene=args.seconds_per_scene, height=height,
                                   width=width, storage=args.storage,
                                   occluders=args.drive == 'occluded', progress=progress)
        print(f'wrote {path}')
    return 0
