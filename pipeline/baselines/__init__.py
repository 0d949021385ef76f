"""The reference members: the cheapest alternatives to the compressed family (TF-IDF + a linear model, a
static embedding model distilled from the teacher), built, measured and reported beside it."""
