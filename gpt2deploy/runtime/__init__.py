"""Runtime: ONNX Runtime sessions, KV cache, sampling, generation. Imports only onnxruntime, numpy, tokenizers."""
