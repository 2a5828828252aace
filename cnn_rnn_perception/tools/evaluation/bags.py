"""
Camera frames and ground-truth labels from recorded bags, without a ROS install.

Reads rosbag2 directories, bare ``.db3`` and ``.mcap`` files and ROS 1 ``.bag`` files through
``rosbags``. Every user mistake (a missing file, an unreadable bag, a topic of the wrong type)
becomes a ``BagError`` whose message names the bag and the topic.
"""

from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

IMAGE_TYPES = ('sensor_msgs/msg/Image', 'sensor_msgs/msg/CompressedImage')
LABEL_TYPE = 'std_msgs/msg/String'


class BagError(ValueError):
    """A bag cannot be used as asked; the message names the bag and what to change."""


@dataclass
class BagFrame:
    """One image message from a bag, with the label in force when it was recorded."""

    bag: str
    topic: str
    log_time_ns: int
    stamp_ns: int
    frame_id: str
    message: Any
    label: str | None = None


@dataclass
class BadMessage:
    """A message in a bag that cannot be deserialized: counted and skipped, not fatal."""

    topic: str
    reason: str


class Labels:
    """Labels over time: the label of a moment is the latest one at or before it."""

    def __init__(self, times_ns: Sequence[int], labels: Sequence[str]) -> None:
        order = sorted(range(len(times_ns)), key=lambda index: times_ns[index])
        self._times = [times_ns[index] for index in order]
        self._labels = [labels[index] for index in order]

    def __len__(self) -> int:
        return len(self._labels)

    def at(self, time_ns: int) -> str | None:
        """Return the latest label at or before ``time_ns``, or None before the first."""
        index = bisect.bisect_right(self._times, time_ns) - 1
        return self._labels[index] if index >= 0 else None

    @classmethod
    def from_csv(cls, path: str | Path) -> Labels:
        """Read a sidecar CSV of ``stamp,label`` rows (stamp in seconds, header optional)."""
        path = Path(path)
        if not path.is_file():
            raise BagError(f'labels file not found: {str(path)!r}')
        times, labels = [], []
        with path.open(newline='') as handle:
            for line_number, row in enumerate(csv.reader(handle), start=1):
                if not row or row[0].strip().lower() == 'stamp':
                    continue
                try:
                    times.append(int(round(float(row[0]) * 1e9)))
                    labels.append(row[1].strip())
                except (ValueError, IndexError):
                    raise BagError(f'{path}:{line_number}: expected "stamp,label" with the '
                                   f'stamp in seconds; got {row!r}') from None
        return cls(times, labels)


def _stamp_ns(message: Any) -> tuple[int, str]:
    header = message.header
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec), header.frame_id


class BagSource:
    """An opened bag: its image topics, its labels, and its frames in recording order."""

    def __init__(self, path: str | Path) -> None:
        from rosbags.highlevel import AnyReader
        self.path = Path(path)
        if not self.path.exists():
            raise BagError(f'bag not found: {str(self.path)!r}')
        try:
            self._reader = AnyReader([self.path])
            self._reader.open()
        except Exception as error:  # rosbags raises many types for damaged or foreign files
            raise BagError(f'{self.path}: cannot read this bag ({error}); expected a rosbag2 '
                           'directory, a .db3 or .mcap file, or a ROS 1 .bag') from None
        self.topics = {c.topic: c.msgtype for c in self._reader.connections}
        self.is_ros2 = self._reader.is2

    def raw_messages(self, topics: Sequence[str], start_ns: int | None = None,
                     stop_ns: int | None = None) -> Iterator[tuple[str, str, int, bytes]]:
        """
        Yield (topic, msgtype, recording time ns, serialized bytes) in recording order.

        ``start_ns`` (included) and ``stop_ns`` (excluded) limit the recording times read.
        """
        connections = [c for c in self._reader.connections if c.topic in topics]
        for connection, log_time, raw in self._reader.messages(
                connections=connections, start=start_ns, stop=stop_ns):
            yield connection.topic, connection.msgtype, log_time, raw

    def message_count(self, topics: Sequence[str]) -> int:
        """Return how many messages the topics hold."""
        return sum(c.msgcount for c in self._reader.connections if c.topic in topics)

    def deserialize(self, raw: bytes, msgtype: str) -> Any:
        """Decode one serialized message."""
        return self._reader.deserialize(raw, msgtype)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> BagSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def image_topics(self, requested: Sequence[str] | None = None) -> list[str]:
        """Return the requested topics after checking them, or every image topic."""
        images = sorted(t for t, msgtype in self.topics.items() if msgtype in IMAGE_TYPES)
        if not requested:
            if not images:
                raise BagError(f'{self.path}: no sensor_msgs/Image or CompressedImage topics '
                               f'(it has {", ".join(sorted(self.topics)) or "no topics"})')
            return images
        for topic in requested:
            if topic not in self.topics:
                raise BagError(f'{self.path}: no topic {topic!r}; image topics here: '
                               f'{", ".join(images) or "none"}')
            if self.topics[topic] not in IMAGE_TYPES:
                raise BagError(f'{self.path}: topic {topic!r} is {self.topics[topic]}, not '
                               'sensor_msgs/msg/Image or CompressedImage')
        return list(requested)

    def labels(self, topic: str) -> Labels:
        """Read a std_msgs/String label topic, keyed by recording time."""
        if topic not in self.topics:
            raise BagError(f'{self.path}: no label topic {topic!r} (topics: '
                           f'{", ".join(sorted(self.topics))})')
        if self.topics[topic] != LABEL_TYPE:
            raise BagError(f'{self.path}: label topic {topic!r} is {self.topics[topic]}, '
                           f'not {LABEL_TYPE}')
        times, labels = [], []
        for _, msgtype, log_time, raw in self.raw_messages([topic]):
            times.append(log_time)
            labels.append(self.deserialize(raw, msgtype).data)
        return Labels(times, labels)

    def frames(self, topics: Sequence[str], labels: Labels | None = None,
               labels_by_stamp: bool = False, start_ns: int | None = None,
               stop_ns: int | None = None) -> Iterator[BagFrame | BadMessage]:
        """
        Yield frames in recording order; a message that cannot be read yields a BadMessage.

        Labels match by recording time (a label topic, same clock as the frames) or, with
        ``labels_by_stamp``, by header stamp (a sidecar CSV of camera stamps).
        """
        count = 0
        try:
            for topic, msgtype, log_time, raw in self.raw_messages(topics, start_ns, stop_ns):
                count += 1
                try:
                    message = self.deserialize(raw, msgtype)
                    stamp, frame_id = _stamp_ns(message)
                except Exception as error:  # a damaged message: counted, not fatal
                    yield BadMessage(topic, f'{self.path} {topic}: cannot deserialize '
                                            f'message {count}: {error}')
                    continue
                label = None
                if labels is not None:
                    label = labels.at(stamp if labels_by_stamp else log_time)
                yield BagFrame(bag=str(self.path), topic=topic, log_time_ns=log_time,
                               stamp_ns=stamp, frame_id=frame_id, message=message, label=label)
        except Exception as error:  # truncated storage fails mid-iteration
            raise BagError(f'{self.path}: unreadable after {count} messages ({error}); the bag '
                           'may be truncated') from None


class BagWriter:
    """
    Write camera frames and labels to a new rosbag2 (sqlite3 or mcap), no ROS install needed.

    Used by the synthetic-scene tool and by the tests, which never check in binary bags.
    """

    def __init__(self, path: str | Path, *, storage: str = 'sqlite3') -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer
        from rosbags.typesys import get_typestore, Stores
        plugins = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}
        if storage not in plugins:
            raise ValueError(f'storage must be sqlite3 or mcap; got {storage!r}')
        self.typestore = get_typestore(Stores.ROS2_KILTED)
        self._writer = Writer(Path(path), version=9, storage_plugin=plugins[storage])
        self._writer.open()
        self._connections: dict[str, Any] = {}

    def _connection(self, topic: str, msgtype: str) -> Any:
        if topic not in self._connections:
            self._connections[topic] = self._writer.add_connection(
                topic, msgtype, typestore=self.typestore)
        return self._connections[topic]

    def header(self, stamp_ns: int, frame_id: str) -> Any:
        """Return a std_msgs/Header in this bag's type store."""
        types = self.typestore.types
        stamp = types['builtin_interfaces/msg/Time'](sec=stamp_ns // 1_000_000_000,
                                                     nanosec=stamp_ns % 1_000_000_000)
        return types['std_msgs/msg/Header'](stamp=stamp, frame_id=frame_id)

    def write_raw(self, topic: str, msgtype: str, log_time_ns: int, raw: bytes) -> None:
        """Write already serialized bytes (tests use it to plant damaged messages)."""
        self._writer.write(self._connection(topic, msgtype), log_time_ns, raw)

    def write_message(self, topic: str, msgtype: str, log_time_ns: int, message: Any) -> None:
        self.write_raw(topic, msgtype, log_time_ns,
                       bytes(self.typestore.serialize_cdr(message, msgtype)))

    def write_image(self, topic: str, pixels: Any, encoding: str, stamp_ns: int,
                    frame_id: str = 'camera', log_time_ns: int | None = None) -> None:
        """Write a sensor_msgs/Image of a packed HxW[xC] array."""
        import numpy as np
        pixels = np.ascontiguousarray(pixels)
        height, width = pixels.shape[:2]
        message = self.typestore.types['sensor_msgs/msg/Image'](
            header=self.header(stamp_ns, frame_id), height=height, width=width,
            encoding=encoding, is_bigendian=0, step=pixels.nbytes // height,
            data=pixels.reshape(-1).view(np.uint8))
        self.write_message(topic, 'sensor_msgs/msg/Image',
                           stamp_ns if log_time_ns is None else log_time_ns, message)

    def write_compressed(self, topic: str, data: bytes, fmt: str, stamp_ns: int,
                         frame_id: str = 'camera', log_time_ns: int | None = None) -> None:
        """Write a sensor_msgs/CompressedImage holding encoded bytes (JPEG, PNG)."""
        import numpy as np
        message = self.typestore.types['sensor_msgs/msg/CompressedImage'](
            header=self.header(stamp_ns, frame_id), format=fmt,
            data=np.frombuffer(data, dtype=np.uint8))
        self.write_message(topic, 'sensor_msgs/msg/CompressedImage',
                           stamp_ns if log_time_ns is None else log_time_ns, message)

    def write_label(self, topic: str, label: str, log_time_ns: int) -> None:
        """Write a std_msgs/String label, in force from ``log_time_ns`` on."""
        self.write_message(topic, LABEL_TYPE, log_time_ns,
                           self.typestore.types[LABEL_TYPE](data=label))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
