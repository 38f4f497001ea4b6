"""Activation-sparsity regime training, distributed."""
