"""Inference: the Predictor (PyTorch or ONNX Runtime) and ONNX export with a parity check."""
