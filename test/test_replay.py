"""Replay a bag into a running node: one ~/scene per frame, with the bag's stamps."""

import json

import pytest
from ros_harness import NodeProcess, SMALL_MODEL
from test_bags import run, SECOND, write_scene_bag

pytestmark = pytest.mark.slow


@pytest.mark.parametrize('pacing', [['--rate', '2.0'], ['--as-fast-as-possible', '--lockstep']])
def test_replay_gives_one_scene_per_frame_with_the_bags_stamps(tmp_path, pacing):
    bag_path = write_scene_bag(tmp_path / 'scenes', bad_frame=False)
    node = NodeProcess(tmp_path, *SMALL_MODEL, '-p',
                       "image_topics:=['/front/image_raw', '/rear/image_raw/compressed']")
    record = tmp_path / 'scenes.jsonl'
    try:
        result = run('replay', str(bag_path), '--label-topic', '/scene_label', '--record',
                     str(record), '--qos', 'reliable', '--wait', '120', '--no-progress',
                     *pacing)
        assert result.returncode == 0, result.stderr + node.log()
        assert 'published /front/image_raw 12, /rear/image_raw/compressed 6' in result.stdout
    finally:
        assert node.stop() == 0
    scenes = [json.loads(line) for line in record.read_text().splitlines()]
    front = sorted(s['stamp']['sec'] * SECOND + s['stamp']['nanosec'] for s in scenes
                   if s['topic'] == '/front/image_raw')
    rear = sorted(s['stamp']['sec'] * SECOND + s['stamp']['nanosec'] for s in scenes
                  if s['topic'] == '/rear/image_raw/compressed')
    assert front == [10 * SECOND + i * 100_000_000 for i in range(12)]
    assert rear == [10 * SECOND + i * 100_000_000 + 1 for i in range(0, 12, 2)]
    scored = run('evaluate', str(bag_path), '--scenes', str(record), '--label-topic',
                 '/scene_label', '--summary', str(tmp_path / 'summary.json'))
    assert scored.returncode == 0, scored.stderr
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['frames'] == 18 and summary['scored_frames'] == 15
    assert summary['unmatched_scenes'] == 3  # the frames before the first label


def test_replay_without_a_subscriber_says_what_to_check(tmp_path):
    bag_path = write_scene_bag(tmp_path / 'scenes', bad_frame=False)
    result = run('replay', str(bag_path), '--wait', '1', '--no-progress')
    assert result.returncode == 2
    assert 'no subscriber on /front/image_raw' in result.stderr
    assert 'same ROS_DOMAIN_ID' in result.stderr
