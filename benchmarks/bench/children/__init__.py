"""Child processes of the benchmark: each runs in a fresh interpreter (``python -m
benchmarks.bench.children.<name> '<json arguments>'``) and prints one JSON line.

Fresh, because cold start, peak memory and import time are what a new process sees, and because the
runtime ones must prove torch never enters ``sys.modules``; nothing here imports torch or bdm at
module level, so each child's own imports are what it measures.
"""
