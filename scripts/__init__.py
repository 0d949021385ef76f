"""Developer scripts; a package so the tests can import scripts.tiny_project and scripts.dvc_deps."""
