"""
Benchmarks and checks: how fast each engine path is, and whether it agrees with fp32.

``bench`` (the engine against the seed's way, and every backend), ``bench_node`` (the running
node end to end), ``bench_order`` (the recurrent head sees order), ``selftest`` (every engine
path on this device) and ``classify`` (generated frames through one engine).
"""
