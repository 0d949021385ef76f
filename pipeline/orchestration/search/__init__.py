"""Compress to a goal: an Optuna search over the compression recipe for the fastest ONNX INT8 model that
meets the user's goals (validation macro-F1 retention against the teacher, p50 latency at batch 1 and 1
thread, size on disk), within a budget of trials and minutes.

Every search dimension (params `search.space`) maps onto existing params keys, so a trial is a params
override: the student (depth, init, KD method and weights), the pruning (heads, FFN neurons, vocabulary
kept) and the INT8 scheme. A trial runs the student stage, prune and export_onnx for its params into
trial-private paths, on a view of the prepared data WITHOUT the test split (pipeline.data.prepared.write_view:
its file is absent and reading it is an error), then times the INT8 model with the benchmark harness.
The test split is read once, after the search, when the winner is rebuilt as a DVC experiment.

Optuna (multi-objective: validation F1 up, p50 down, size down; the goals as constraints) keeps the
study in a sqlite file beside the MLflow database, so a stopped search resumes where it was. Once a trial
meets every goal, only a strictly faster model (or as fast and smaller) counts as progress, and the
search stops after `search.patience` trials without any.

This package is the library: it never imports the stages. scripts/search.py wires the stages in and is
the command line (`make search`). Its modules: space (the space and its mapping onto params), goals
(goals and stopping), study (one trial and the study), answer (the summary and the winner's command),
runner (the whole search).
"""
