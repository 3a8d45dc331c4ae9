"""Policy side: chat rendering and token-exact tokenization, parsing, engines, the rollout loop.

Imports nothing heavy; engines import torch/transformers/vllm lazily.
"""
