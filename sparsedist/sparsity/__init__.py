"""Top-k activation sparsity: the constraint at every site, its statistics, and tau calibration.

`layer` scope is the paper's per-sample, per-site top-k; `network` scope is one all-layer threshold
shared by every site and every replica. The package knows nothing of Ray, data files or the CLI.
"""

from sparsedist.sparsity.activation import SCOPES, ActivationSparsity, CalibrationResult, StepStats

__all__ = ["SCOPES", "ActivationSparsity", "CalibrationResult", "StepStats"]
