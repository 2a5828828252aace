"""Replay a bag into a running node: one ~/scene per frame, with the bag's stamps."""

import json

import pytest
from ros_harness import Harness, NodeProcess, SMALL_MODEL
from test_bags import FIRST_LABEL, run, SECOND, write_scene_bag

pytestmark = pytest.mark.slow


FRONT = '/front/image_raw'
REAR = '/rear/image_raw/compressed'


# Paced replay is how a team tests the node at the cameras' speed: a frame that comes while
# the node is busy is dropped as stale by design, so there every frame must be accounted for
# and every scene must carry its frame's stamp. Lockstep is how evaluate gets one scene for
# every frame.
@pytest.mark.parametrize('pacing', [['--rate', '2.0'], ['--as-fast-as-possible', '--lockstep']])
def test_replay_gives_one_scene_per_frame_with_the_bags_stamps(tmp_path, pacing):
    bag_path = write_scene_bag(tmp_path / 'scenes', bad_frame=False)
    harness = Harness()
    node = NodeProcess(tmp_path, *SMALL_MODEL, '-p', f"image_topics:=['{FRONT}', '{REAR}']")
    record = tmp_path / 'scenes.jsonl'
    try:
        result = run('replay', str(bag_path), '--label-topic', '/scene_label', '--record',
                     str(record), '--qos', 'reliable', '--wait', '120', '--no-progress',
                     *pacing)
        assert result.returncode == 0, result.stderr + node.log()
        assert f'published {FRONT} 12, {REAR} 6' in result.stdout
        counts = {FRONT: harness.wait_accounted(FRONT, 12), REAR: harness.wait_accounted(REAR, 6)}
    finally:
        harness.close()
        assert node.stop() == 0
    scenes = [json.loads(line) for line in record.read_text().splitlines()]
    stamps = {topic: sorted(s['stamp']['sec'] * SECOND + s['stamp']['nanosec'] for s in scenes
                            if s['topic'] == topic) for topic in (FRONT, REAR)}
    recorded = {FRONT: [10 * SECOND + i * 100_000_000 for i in range(12)],
                REAR: [10 * SECOND + i * 100_000_000 + 1 for i in range(0, 12, 2)]}
    for topic in (FRONT, REAR):
        assert counts[topic]['rejected'] == 0
        assert len(stamps[topic]) == counts[topic]['classified']
        assert counts[topic]['classified'] + counts[topic]['dropped_stale'] == len(recorded[topic])
        assert set(stamps[topic]) <= set(recorded[topic]), 'a scene without a frame stamp'
        if '--lockstep' in pacing:
            assert stamps[topic] == recorded[topic]
    scored = run('evaluate', str(bag_path), '--scenes', str(record), '--label-topic',
                 '/scene_label', '--summary', str(tmp_path / 'summary.json'))
    assert scored.returncode == 0, scored.stderr
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['frames'] == len(scenes)
    unlabelled = sum(1 for s in scenes if s['stamp']['sec'] * SECOND + s['stamp']['nanosec']
                     < FIRST_LABEL)
    assert summary['unmatched_scenes'] == unlabelled
    assert summary['scored_frames'] == len(scenes) - unlabelled
    if '--lockstep' in pacing:
        assert (summary['frames'], summary['scored_frames'], summary['unmatched_scenes']) == \
            (18, 15, 3)


def test_replay_without_a_subscriber_says_what_to_check(tmp_path):
    bag_path = write_scene_bag(tmp_path / 'scenes', bad_frame=False)
    result = run('replay', str(bag_path), '--wait', '1', '--no-progress')
    assert result.returncode == 2
    assert 'no subscriber on /front/image_raw' in result.stderr
    assert 'same ROS_DOMAIN_ID' in result.stderr
