"""The data: sources and their readers, checks and the stratified split, the prepared splits on disk,
labels (light: ONNX serving imports it without torch), multi-label helpers and the transfer texts."""
