"""Measuring the family: metrics, the per-model record, the family members, the latency benchmark,
the comparison report, its plots and the model card."""
