"""The BERT tier: a fine-tuned encoder under ONNX Runtime, answering in milliseconds on a CPU.

Inference runs in three steps (tokenize → run → calibrate) plus a warm-up:

1. :meth:`BertClassifier.encode` splits every text into windows of at most ``max_length`` tokens
   (special tokens included) that overlap by ``chunk_overlap`` tokens, so nothing is truncated.
2. :meth:`BertClassifier.run` sorts all windows of a batch by length, cuts them into
   sub-batches of ``batch_size``, pads each only to its own longest window and runs ONNX Runtime.
3. :meth:`BertClassifier.calibrate` divides the logits by the fitted temperature, applies
   softmax (single-label) or sigmoid (multi-label) and aggregates a text's windows: the mean
   probability for single-label, the maximum per label for multi-label.

No torch and no transformers are imported here: only onnxruntime, tokenizers and numpy.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from tiergate.workers.bert.manifest import ONNX_FILE, TOKENIZER_FILE, ModelManifest, read_manifest
from tiergate.workers.bert.scheduling import StepScheduler, plan_steps
from tiergate.workers.bert.temperature import sigmoid, softmax
from tiergate.workers.bert.windows import Windows, WindowTokenizer
from tiergate.workers.errors import InputError, ModelIntegrityError
from tiergate.workers.schemas import Prediction
from tiergate.workers.settings import Settings

_KNOWN_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


class BertClassifier:
    """A classifier over one model directory.

    ``predict(texts)`` returns one :class:`~tiergate.workers.schemas.Prediction` per text, in input
    order. The ONNX Runtime session is created on first use and re-created if the process has
    forked since, so one instance may be built before a prefork worker pool starts. Instances
    are safe to share between threads.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        batch_size: int = 32,
        chunk_overlap: int | None = None,
        verify: bool = True,
        spin_wait: bool = False,
        scheduler: StepScheduler | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.manifest: ModelManifest = read_manifest(self.model_dir, verify=verify)
        unknown = set(self.manifest.inputs) - _KNOWN_INPUTS
        if unknown:
            raise ModelIntegrityError(self.model_dir, f"unsupported ONNX inputs {sorted(unknown)}")
        self.intra_op_threads = intra_op_threads
        self.spin_wait = spin_wait
        self.inter_op_threads = inter_op_threads
        self.batch_size = batch_size
        self.scheduler = scheduler
        self.tokenizer = Tokenizer.from_file(str(self.model_dir / TOKENIZER_FILE))
        self.window_tokenizer = WindowTokenizer(
            self.tokenizer, self.manifest.max_length, chunk_overlap
        )
        self.chunk_overlap = self.window_tokenizer.chunk_overlap
        self._pad_id = self._find_pad_id()
        self._session: ort.InferenceSession | None = None
        self._session_pid: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        model_dir: Path | None = None,
        scheduler: StepScheduler | None = None,
    ) -> BertClassifier:
        """Build a classifier with thread counts, batch size and overlap from ``settings``."""
        return cls(
            model_dir or settings.resolved_model_dir,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            batch_size=settings.batch_size,
            chunk_overlap=settings.chunk_overlap,
            spin_wait=settings.intra_op_spin_wait,
            scheduler=scheduler,
        )

    @property
    def labels(self) -> tuple[str, ...]:
        """The model's label set, in the order of its outputs."""
        return self.manifest.labels

    @property
    def model_version(self) -> str:
        """The version stamped on every prediction."""
        return self.manifest.model_version

    @property
    def session(self) -> ort.InferenceSession:
        """This process's ONNX Runtime session, created on first use (and after a fork)."""
        pid = os.getpid()
        if self._session is None or self._session_pid != pid:
            with self._lock:
                if self._session is None or self._session_pid != pid:
                    self._session = self._create_session()
                    self._session_pid = pid
        return self._session

    def _create_session(self) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not self.spin_wait:
            # Idle ONNX Runtime threads otherwise spin on the CPU between batches, taking it
            # from the web server, the broker client and other processes on a small machine.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(
                str(self.model_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for a bad file
            raise ModelIntegrityError(
                self.model_dir, f"ONNX Runtime cannot load it: {exc}"
            ) from exc

    def _find_pad_id(self) -> int:
        padding = self.tokenizer.padding
        if padding is not None:
            return int(padding["pad_id"])
        for token in ("[PAD]", "<pad>", "<PAD>"):
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return 0

    def warmup(self) -> None:
        """Create the session and run one small batch, so the first real call is not slow."""
        self.predict(["tiergate warm-up", "a second, somewhat longer warm-up message"])

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Calibrated predictions for ``texts``, in the same order.

        Raises:
            InputError: a text is not a string, or is empty or only whitespace.
        """
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"text {index} is {type(text).__name__}, not a string")
            if not text.strip():
                raise InputError(f"text {index} is empty or only whitespace")
        if not texts:
            return []
        windows = self.encode(texts)
        logits = self.run(windows.ids)
        return self.calibrate(logits, windows)

    def is_long(self, text: str) -> bool:
        """Whether :meth:`encode` cuts ``text`` into more than one window.

        Only the first ``8 x max_length`` characters are tokenized (a fraction of a
        millisecond); a longer text whose beginning still fits one window counts as long.
        """
        head = text[: 8 * self.manifest.max_length]
        return len(head) < len(text) or bool(self.tokenizer.encode(head).overflowing)

    def encode(self, texts: Sequence[str]) -> Windows:
        """Tokenize texts into overlapping windows of at most ``max_length`` tokens."""
        return self.window_tokenizer.encode(texts)

    def run(self, windows: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """Logits for every window, in input order, computed in length-sorted sub-batches.

        With a :class:`StepScheduler`, the sub-batches are cut to its step size and each one
        waits for its turn at the shared session (see :mod:`tiergate.workers.bert.scheduling`).
        """
        order = sorted(range(len(windows)), key=lambda j: len(windows[j]))
        logits = np.empty((len(windows), len(self.labels)), dtype=np.float32)
        session = self.session
        lengths = [len(windows[j]) for j in order]
        if self.scheduler is None:
            steps = [
                list(range(start, min(start + self.batch_size, len(order))))
                for start in range(0, len(order), self.batch_size)
            ]
        else:
            steps = plan_steps(lengths, self.scheduler.step_tokens, self.batch_size)
        tokens_left = sum(lengths)
        started = time.monotonic()
        for step in steps:
            chunk = [order[position] for position in step]
            feed = self._feed([windows[j] for j in chunk])
            out: Any
            if self.scheduler is None:
                out = session.run(None, feed)[0]
            else:
                with self.scheduler.turn(tokens_left, since=started):
                    out = session.run(None, feed)[0]
            tokens_left -= sum(lengths[position] for position in step)
            logits[chunk] = out
        return logits

    def _feed(self, batch: Sequence[Sequence[int]]) -> dict[str, npt.NDArray[np.int64]]:
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.manifest.inputs:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return {name: feed[name] for name in self.manifest.inputs}

    def calibrate(
        self, logits: npt.ArrayLike, windows: Windows, *, temperature: float | None = None
    ) -> list[Prediction]:
        """Temperature-scaled probabilities per window, aggregated per text.

        ``temperature`` overrides the manifest's (training uses 1.0 to measure calibration
        before scaling).
        """
        manifest = self.manifest
        t = manifest.temperature if temperature is None else temperature
        probs = sigmoid(logits, t) if manifest.multi_label else softmax(logits, t)
        predictions = []
        start = 0
        for count in windows.counts:  # a text's windows are contiguous, in text order
            rows = probs[start : start + count]
            start += count
            aggregated = rows.max(axis=0) if manifest.multi_label else rows.mean(axis=0)
            predictions.append(
                Prediction(
                    labels=manifest.labels,
                    probabilities=tuple(float(p) for p in aggregated),
                    multi_label=manifest.multi_label,
                    chunks=count,
                    model_version=manifest.model_version,
                )
            )
        return predictions
