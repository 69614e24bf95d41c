"""What the eval and the learning summary share: the CLIP scorer (clip.py, also the `clip` reward
backend's), metric functions and the KD/FD feature model (metrics.py), the metric registry
(registry.py: direction, order, label, format), charts (charts.py), run-metrics reading
(run_metrics.py), the eval report (report.py) and the learning-summary library (learning.py)."""
