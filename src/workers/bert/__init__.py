"""The BERT tier: load a model directory and classify under ONNX Runtime (no torch)."""

from workers.bert.classifier import BertClassifier
from workers.bert.manifest import Head, ModelManifest, read_manifest

__all__ = ["BertClassifier", "Head", "ModelManifest", "read_manifest"]
