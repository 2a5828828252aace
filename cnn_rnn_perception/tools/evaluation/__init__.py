"""
Evaluation and replay: what a model says on recorded drives, and how right it is.

``evaluate`` is the command over ``runner`` (the engine over every frame of bags) and
``metrics`` (accuracy, confusion, flicker, switch delay: pure functions); ``replay`` plays a
bag into ROS; ``bags`` reads and writes rosbag2 and ROS 1 bags.
"""
