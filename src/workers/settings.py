"""All of tiergate's configuration, read once from the environment (prefix ``TIERGATE_``)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "tiergate"


class Settings(BaseSettings):
    """tiergate's settings.

    Built once at a front door (the CLI, later the HTTP app factory and the Celery app factory)
    and passed down explicitly; nothing deeper reads the environment. Every field can be set as
    ``TIERGATE_<FIELD>`` (for example ``TIERGATE_MODEL_DIR=/srv/model``).
    """

    model_config = SettingsConfigDict(env_prefix="TIERGATE_", extra="ignore")

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where tiergate keeps built models and prepared datasets.",
    )
    model_dir: Path | None = Field(
        default=None,
        description="The BERT-tier model directory; defaults to <data_dir>/models/default.",
    )
    intra_op_threads: PositiveInt = Field(
        default_factory=lambda: os.cpu_count() or 1,
        description="ONNX Runtime threads inside one operator, per process. With several "
        "worker processes on one machine, set it to cores / processes.",
    )
    inter_op_threads: PositiveInt = Field(
        default=1, description="ONNX Runtime threads across operators (the graph is sequential)."
    )
    batch_size: PositiveInt = Field(
        default=32, description="Windows per ONNX Runtime call; batches are sorted by length."
    )
    chunk_overlap: int | None = Field(
        default=None,
        ge=0,
        description="Tokens shared by consecutive windows when a text is longer than the "
        "model's window (default: a quarter of the window).",
    )
    log_level: str = Field(default="INFO", description="structlog level name.")

    @property
    def resolved_model_dir(self) -> Path:
        """The model directory to load: ``model_dir`` if set, else the default model's."""
        return self.model_dir if self.model_dir is not None else self.default_model_dir

    @property
    def default_model_dir(self) -> Path:
        """Where ``tiergate model build-default`` writes (and later finds) the default model."""
        return self.data_dir / "models" / "default"
