"""
Launch the perception node with config/perception.yaml and the large-message DDS profile.

For example: ros2 launch cnn_rnn_perception perception.launch.py namespace:=robot1
image_topics:="['/front/image_raw', '/rear/image_raw/compressed']" device:=cuda autostart:=false
policy_file:=/path/to/navigation_policy.yaml
"""

import os

from ament_index_python.packages import get_package_share_directory
from cnn_rnn_perception.ros.dds import profile_variables
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
import yaml

PACKAGE = 'cnn_rnn_perception'


def _node(context, *args, **kwargs):
    def value(name):
        return LaunchConfiguration(name).perform(context)

    overrides = {}
    if value('image_topics'):
        overrides['image_topics'] = yaml.safe_load(value('image_topics'))
    for name, parameter in (('device', 'device'), ('checkpoint', 'model.checkpoint'),
                            ('policy_file', 'navigation.policy_file')):
        if value(name):
            overrides[parameter] = value(name)
    if value('autostart'):
        overrides['autostart'] = value('autostart').lower() == 'true'
    return [Node(
        package=PACKAGE, executable='perception_node', name='cnn_rnn_perception',
        namespace=value('namespace'), output='screen',
        parameters=[value('params_file'), overrides],
        arguments=['--ros-args', '--log-level', value('log_level')])]


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument(
            'params_file', default_value=os.path.join(share, 'config', 'perception.yaml'),
            description='Node parameters (every parameter is documented in the default file)'),
        DeclareLaunchArgument('namespace', default_value='',
                              description='Namespace for the node and its topics'),
        DeclareLaunchArgument(
            'image_topics', default_value='',
            description="Camera topics as a YAML list, e.g. \"['/cam/image_raw']\"; "
                        'empty keeps the params file value'),
        DeclareLaunchArgument('device', default_value='',
                              description='auto, cpu, cuda or cuda:N; empty keeps the params '
                                          'file value'),
        DeclareLaunchArgument('checkpoint', default_value='',
                              description='Model checkpoint file; empty keeps the params file '
                                          'value'),
        DeclareLaunchArgument(
            'policy_file', default_value='',
            description='Scene policy for Nav2 (speed limit, controller, planner per scene), '
                        'e.g. the example ' + os.path.join(share, 'config',
                                                           'navigation_policy.yaml')
                        + '; empty keeps the params file value'),
        DeclareLaunchArgument('autostart', default_value='',
                              description='true: the node configures and activates itself; '
                                          'false: a lifecycle manager (or ros2 lifecycle set) '
                                          'drives it; empty keeps the params file value'),
        DeclareLaunchArgument('log_level', default_value='info',
                              description='debug, info, warn, error or fatal'),
        DeclareLaunchArgument(
            'dds_profile', default_value=os.path.join(share, 'config', 'fastdds_shm.xml'),
            description='Fast DDS profile with a 16 MB shared-memory segment, so best-effort '
                        'camera frames arrive; load the same file in the camera driver'),
        # Fast DDS 3 (Kilted) reads the first name, Fast DDS 2 (Humble, Jazzy) the second.
        *[SetEnvironmentVariable(name, LaunchConfiguration('dds_profile'))
          for name in profile_variables()],
        OpaqueFunction(function=_node),
    ])
