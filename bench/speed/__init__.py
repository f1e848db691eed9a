"""Speed benchmarks (ratios measured in one run against a baseline in the same process) and the GPU check."""
