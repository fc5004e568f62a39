"""Benchmarks: each writes one results JSON; leaderboards are generated from those files."""
