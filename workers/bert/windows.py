"""Cutting texts into the overlapping token windows a model reads.

One :class:`WindowTokenizer` serves both sides of a model: the BERT tier cuts every message with
it before inference, and training cuts every training and validation text with it, so a model
trains on exactly the windows it is later served. Pure ``tokenizers``: no torch, no ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from tiergate.workers.errors import InputError


@dataclass(frozen=True)
class Windows:
    """The tokenized windows of a batch of texts.

    ``ids[j]`` is one window's token ids (special tokens included) and ``owner[j]`` the index of
    the text it came from; ``counts[i]`` is how many windows text ``i`` has. A text's windows
    are contiguous and in text order, so its first window is the first row it owns.
    """

    ids: list[list[int]]
    owner: list[int]
    counts: list[int]

    def first_rows(self) -> list[int]:
        """The row of each text's first window, in text order."""
        rows, start = [], 0
        for count in self.counts:
            rows.append(start)
            start += count
        return rows


def default_overlap(window: int) -> int:
    """The tokens two consecutive windows share unless configured: a quarter of the window."""
    return window // 4


class WindowTokenizer:
    """A text tokenizer that cuts each text into windows of at most ``window`` tokens.

    Windows count special tokens and overlap by ``chunk_overlap`` tokens (default: a quarter of
    the window), so nothing of a long text is dropped. The tokenizer passed in is reconfigured
    in place (no padding; truncation with stride and overflow), so pass one that nothing else
    uses.

    Raises:
        InputError: ``chunk_overlap`` leaves no room for new tokens in each window.
    """

    def __init__(self, tokenizer: Tokenizer, window: int, chunk_overlap: int | None = None) -> None:
        special = tokenizer.num_special_tokens_to_add(is_pair=False)
        if chunk_overlap is None:
            chunk_overlap = default_overlap(window)
        if not 0 <= chunk_overlap < (window - special) // 2:
            raise InputError(
                f"chunk_overlap must be between 0 and {(window - special) // 2 - 1} "
                f"for a window of {window} tokens"
            )
        self.tokenizer = tokenizer
        self.window = window
        self.chunk_overlap = chunk_overlap
        tokenizer.no_padding()
        tokenizer.enable_truncation(window, stride=chunk_overlap, strategy="longest_first")

    def encode(self, texts: Sequence[str]) -> Windows:
        """Tokenize ``texts`` into their windows, each text's windows contiguous and in order."""
        ids: list[list[int]] = []
        owner: list[int] = []
        counts: list[int] = []
        for index, encoding in enumerate(self.tokenizer.encode_batch(list(texts))):
            parts = [encoding, *encoding.overflowing]
            counts.append(len(parts))
            for part in parts:
                ids.append(part.ids)
                owner.append(index)
        return Windows(ids=ids, owner=owner, counts=counts)
