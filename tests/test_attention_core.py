"""scripts/attention_core.py: its hand-built attention graph computes what ONNX Runtime's
MultiHeadAttention computes (else its timing compares different work)."""

import numpy as np
import onnxruntime as ort
import pytest

from scripts.attention_core import identity, lean, multi_head


@pytest.mark.parametrize("tokens, heads, head_size", [(7, 4, 8), (1, 2, 16)])
def test_lean_graph_matches_multi_head_attention(tokens, heads, head_size):
    width = heads * head_size
    rng = np.random.default_rng(1)
    feed = {name: rng.standard_normal((1, tokens, width)).astype(np.float32) for name in "qkv"}
    run = lambda graph: ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    expected = run(multi_head(heads, width))
    np.testing.assert_allclose(run(lean(heads, head_size)), expected, atol=1e-5)
    assert not np.allclose(expected, feed["q"])  # attention, not a copy


def test_identity_graph_copies_its_input():
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    out = ort.InferenceSession(identity(4), providers=["CPUExecutionProvider"]).run(None, {"q": x})[0]
    np.testing.assert_array_equal(out, x)
