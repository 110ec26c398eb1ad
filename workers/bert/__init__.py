"""The BERT tier: load a model directory and classify under ONNX Runtime (no torch)."""

from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.manifest import Head, ModelManifest, read_manifest

__all__ = ["BertClassifier", "Head", "ModelManifest", "read_manifest"]
