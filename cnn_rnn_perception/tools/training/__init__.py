"""
Training: from images or labelled bags to a model the robot runs.

``train`` is the command; ``data`` reads image folders and bags into samples, ``loop`` holds
one epoch of training and one validation (frames and clips), ``clips`` streams a temporal
model's clips from bags; ``export`` turns a checkpoint into ONNX or OpenVINO files.
"""
