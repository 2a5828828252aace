"""ament_python package: colcon build on a robot, or pip install anywhere."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'cnn_rnn_perception'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*.yaml') + glob('config/*.xml')),
    ],
    python_requires='>=3.10',
    # The ML stack only: ROS packages come from apt on a robot and from requirements.txt here.
    install_requires=['setuptools', 'numpy', 'opencv-python-headless', 'torch', 'torchvision',
                      'rosbags', 'rosbags-image', 'tqdm', 'pyyaml', 'psutil', 'matplotlib'],
    # bench-order reads scikit-learn's bundled handwritten digits; the node never needs it.
    # export and the onnxruntime / openvino backends (nncf: int8 quantization); the torch
    # backend needs neither.
    extras_require={'bench': ['scikit-learn'],
                    'onnx': ['onnx', 'onnxscript', 'onnxruntime'],
                    'openvino': ['onnx', 'onnxscript', 'openvino', 'nncf']},
    zip_safe=True,
    maintainer='cnn_rnn_perception maintainers',
    maintainer_email='maintainers@cnn-rnn-perception.invalid',
    description='CNN-RNN scene classification node for ROS 2 navigation stacks.',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            f'{PACKAGE} = {PACKAGE}.tools.cli:main',
            f'perception_node = {PACKAGE}.ros.perception_node:main',
        ],
    },
)
