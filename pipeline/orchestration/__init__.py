"""Running the DAG as a whole: the Prefect flow and the compression search."""
