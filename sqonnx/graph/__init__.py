"""The graph facts every pass needs (onnx-ir): linear layers, constant tensors, TensorRT's import rules."""
