"""tiergate policies: pure decision logic, with no network, Redis or ONNX."""
