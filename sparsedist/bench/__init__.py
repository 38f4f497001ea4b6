"""Benchmarks behind `sparsedist bench ...`: measurements, not tests."""
