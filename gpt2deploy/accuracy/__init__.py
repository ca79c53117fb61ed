"""Accuracy checks: metrics of a variant versus a reference on real text, gates, baselines and reports.

Only numpy, onnxruntime and tokenizers are needed; a PyTorch reference imports torch lazily.
"""
