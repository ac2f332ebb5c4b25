"""CTM training tasks: data, targets and metrics, one module per task."""
