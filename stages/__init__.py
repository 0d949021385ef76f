"""One module per DVC stage: read params, call `pipeline/`, write outputs and metrics."""
