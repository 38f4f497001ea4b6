"""Trained models leaving the project: `sparsedist export`, `load_model`, and the torch.export program.

`sparsedist.export.load` (what `sparsedist.load_model` is) never imports Ray or FFCV; `export.py`
evaluates the checkpoint on its data first and so needs the whole stack.
"""
