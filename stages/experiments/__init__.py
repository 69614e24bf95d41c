"""The experiments of examples/ablations/ read back: their runs, tables, curves and render grids
(rl3d learning-summary ablations). Analysis of finished runs, not a stage: nothing here is scored."""
