from sparsedist.models.wrn import WideResNet, build_model

__all__ = ["WideResNet", "build_model"]
