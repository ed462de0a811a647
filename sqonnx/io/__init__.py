"""Files in and out: reading a model, writing the output atomically and block by block,
onnxruntime-genai's companions."""
