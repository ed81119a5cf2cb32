"""Sparse training core: densities, masks, schedules, prune-and-grow."""
