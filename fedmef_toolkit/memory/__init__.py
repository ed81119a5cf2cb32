"""Memory footprint of one client training step: estimated and measured."""
