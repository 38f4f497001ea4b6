"""Results of runs and sweeps: across-seed statistics, sweep tables, figures, checkpoint evaluation.

Reads run directories (the layout in `sparsedist.rundir`) and never imports Ray.
"""
