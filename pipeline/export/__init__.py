"""Export and runtime: ONNX export and ONNX Runtime quantization, the torch-free ONNX classifier,
command-line prediction and the MLflow text-in pyfunc (serving)."""
