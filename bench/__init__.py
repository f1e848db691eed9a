"""Benchmarks: the studies that write docs/ (studies/) and the speed benchmarks with the GPU check (speed/);
common.py holds what they share (data folder, default model, evaluation, resumable rows, statistics)."""
