"""What training needs, the teacher's included: the loss-summing Trainer and the hard-label term,
encoding and collating the splits, Trainer arguments, resumable checkpoints, the saved model and its
loss curve. Nothing here imports the student-only KD code (pipeline/kd/), so changing that code never
re-trains the teacher (scripts/dvc_deps.py derives each stage's code deps from its imports)."""
