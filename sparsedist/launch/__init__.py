"""Launching runs on Ray: the Train driver and worker, cluster connection, run directory, demo.

The only package that imports Ray; the method (model, sparsity, controllers, loop) knows nothing of it.
"""
