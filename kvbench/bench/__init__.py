"""The benchmark: timing with device sync, the sweep runner, result files and statistics."""
