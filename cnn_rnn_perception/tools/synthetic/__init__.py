"""
Synthetic data: navigation scenes drawn from geometry, as image folders and recorded drives.

``scenes`` draws one frame of a scene; ``synth`` is the command that writes folders and bags
(scene drives, ego-motion drives, texture-motion drives).
"""
