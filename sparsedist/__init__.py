"""Activation-sparsity regime training, distributed.

`sparsedist.load_model` loads an exported model; it is imported on first use so `import sparsedist`
stays light.
"""


def __getattr__(name: str):
    if name == "load_model":
        from sparsedist.export.load import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
