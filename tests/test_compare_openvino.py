"""scripts/compare_openvino: the padding that gives OpenVINO's static-shape models their inputs."""

import numpy as np

from scripts.compare_openvino import padded


def test_padded_fills_with_zeros_and_keeps_the_tokens() -> None:
    feed = {"input_ids": np.array([[101, 7, 102]]), "attention_mask": np.array([[1, 1, 1]])}
    out = padded(feed, 5)
    assert out["input_ids"].tolist() == [[101, 7, 102, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert out["input_ids"].dtype == feed["input_ids"].dtype


def test_padded_cuts_longer_texts() -> None:
    out = padded({"input_ids": np.arange(6)[None, :]}, 4)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3]]
