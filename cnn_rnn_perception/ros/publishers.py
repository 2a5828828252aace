"""
The node's lifecycle publishers, each with the QoS its consumers ask for.

Made in on_configure and destroyed in on_cleanup; they publish only while the node is active.
``/diagnostics`` is not among them: it reports in every state, so the node keeps it apart.
"""

from __future__ import annotations

from typing import Any

from cnn_rnn_perception.ros.outputs import Classification, LabelInfo, SpeedLimit
from rclpy.lifecycle import LifecycleNode
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String

# Nav2's conventions: controller_server subscribes to the speed limit reliable and volatile
# (depth 10, as Nav2's own SpeedFilter publishes it); the BT selector nodes ask for reliable,
# transient local, so a tree started later still gets the choice.
SPEED_LIMIT_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
SELECTOR_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                          durability=DurabilityPolicy.TRANSIENT_LOCAL)
# Transient local, as vision_msgs asks: a consumer that starts later gets it.
LABEL_INFO_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL)


def create_outputs(node: LifecycleNode, values: dict[str, Any]) -> dict[str, Any]:
    """Create every output the installed messages allow, keyed by what it carries."""
    publish = node.create_lifecycle_publisher
    outputs = {'scene': publish(String, '~/scene', 10)}
    if Classification is not None:
        outputs['classification'] = publish(Classification, '~/classification', 10)
        outputs['label_info'] = publish(LabelInfo, '~/label_info', LABEL_INFO_QOS)
        outputs['robot_classification'] = publish(Classification, '~/robot_classification', 10)
    outputs['robot_scene'] = publish(String, '~/robot_scene', 10)
    outputs['debug_image'] = publish(Image, '~/debug_image', 1)
    if SpeedLimit is not None:
        outputs['speed_limit'] = publish(SpeedLimit, values['navigation.speed_limit_topic'],
                                         SPEED_LIMIT_QOS)
    for key in ('controller', 'planner'):
        outputs[f'{key}_selector'] = publish(String, values[f'navigation.{key}_selector_topic'],
                                             SELECTOR_QOS)
    return outputs


def destroy_outputs(node: LifecycleNode, outputs: dict[str, Any]) -> None:
    """Destroy what ``create_outputs`` made."""
    for publisher in outputs.values():
        node.destroy_lifecycle_publisher(publisher)
