"""What `rl3d eval` (stages/eval.py) computes around its gen and render stages: options.py (EvalOptions,
the metric groups), inputs.py (policy names and modes, the prompt file, reference views, final-level
samples), measures.py (samples -> metric rows per category; the metric models), rows.py (the metrics
table's rows)."""
