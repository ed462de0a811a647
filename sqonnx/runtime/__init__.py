"""onnxruntime: sessions, the kernels it really runs, its transformer optimizer."""
