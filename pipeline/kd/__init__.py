"""Student-only knowledge distillation: the KD terms beyond hard labels, the teacher's outputs and
their cache (stage teacher_logits), and building and training the students. The teacher never
imports this package, so changing it never re-trains the teacher."""
