"""Graph rewrites, one per module (onnx-ir passes); fold targets as plug-ins in passes/absorbers."""
