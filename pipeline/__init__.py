"""FinCompress: the library the pipeline stages share. It knows nothing of DVC's CLI or of `stages/`."""
