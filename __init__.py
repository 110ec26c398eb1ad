"""tiergate: a tiered text-classification gateway.

A BERT-family classifier under ONNX Runtime answers most messages; a confidence policy sends the
rest to an LLM. This module is the public face: everything a user needs is importable from
``tiergate`` directly::

    from tiergate import Message, Settings, open_cascade

    cascade = open_cascade(Settings())
    [decision] = cascade.decide([Message(text="A delight from start to finish.")])

The subpackages hold the rest and import one way, ``policies`` <- ``workers`` <- ``gateway``:
:mod:`tiergate.policies` (pure decision logic), :mod:`tiergate.workers` (everything that computes
a decision) and :mod:`tiergate.gateway` (HTTP, CLI, producer client).

Names are imported on first use, so ``import tiergate`` loads neither ONNX Runtime, nor the LLM
SDKs, nor Celery; a worker that imports one subpackage pays for that one only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tiergate.gateway.client import TiergateClient
    from tiergate.gateway.http import create_app
    from tiergate.policies.prediction import Prediction
    from tiergate.policies.routing import Route, decide
    from tiergate.policies.spec import (
        PolicyError,
        PolicySpec,
        Task,
        example_policy,
        load_policy,
        parse_policy,
    )
    from tiergate.workers.bert.classifier import BertClassifier
    from tiergate.workers.cascade import (
        Cascade,
        Classifier,
        PolicyBook,
        build_cascade,
        load_policy_book,
        open_cascade,
    )
    from tiergate.workers.errors import (
        InputError,
        LabelNotInPolicyError,
        LLMError,
        ModelError,
        TiergateError,
        TransientError,
        UnknownDecisionError,
        UnknownPolicyError,
    )
    from tiergate.workers.labels import CollectedExample, open_label_store
    from tiergate.workers.ledger import IdReused
    from tiergate.workers.schemas import Decision, LLMUsage, Message, Status, Tier
    from tiergate.workers.settings import Price, Settings

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    # Messages in, decisions out.
    "Message": "tiergate.workers.schemas",
    "Decision": "tiergate.workers.schemas",
    "LLMUsage": "tiergate.workers.schemas",
    "Status": "tiergate.workers.schemas",
    "Tier": "tiergate.workers.schemas",
    # Configuration.
    "Settings": "tiergate.workers.settings",
    "Price": "tiergate.workers.settings",
    # Policies.
    "PolicySpec": "tiergate.policies.spec",
    "PolicyError": "tiergate.policies.spec",
    "Task": "tiergate.policies.spec",
    "load_policy": "tiergate.policies.spec",
    "parse_policy": "tiergate.policies.spec",
    "example_policy": "tiergate.policies.spec",
    "Prediction": "tiergate.policies.prediction",
    "Route": "tiergate.policies.routing",
    "decide": "tiergate.policies.routing",
    # The cascade and its builders.
    "Cascade": "tiergate.workers.cascade",
    "Classifier": "tiergate.workers.cascade",
    "PolicyBook": "tiergate.workers.cascade",
    "build_cascade": "tiergate.workers.cascade",
    "load_policy_book": "tiergate.workers.cascade",
    "open_cascade": "tiergate.workers.cascade",
    "BertClassifier": "tiergate.workers.bert.classifier",
    # Errors a caller handles.
    "TiergateError": "tiergate.workers.errors",
    "InputError": "tiergate.workers.errors",
    "ModelError": "tiergate.workers.errors",
    "LLMError": "tiergate.workers.errors",
    "TransientError": "tiergate.workers.errors",
    "UnknownPolicyError": "tiergate.workers.errors",
    "UnknownDecisionError": "tiergate.workers.errors",
    "LabelNotInPolicyError": "tiergate.workers.errors",
    # Labels collected for distillation, and people's corrections.
    "CollectedExample": "tiergate.workers.labels",
    "open_label_store": "tiergate.workers.labels",
    # Distributed mode and the HTTP gateway.
    "TiergateClient": "tiergate.gateway.client",
    "IdReused": "tiergate.workers.ledger",
    "create_app": "tiergate.gateway.http",
}

__all__ = [
    "BertClassifier",
    "Cascade",
    "Classifier",
    "CollectedExample",
    "Decision",
    "IdReused",
    "InputError",
    "LLMError",
    "LLMUsage",
    "LabelNotInPolicyError",
    "Message",
    "ModelError",
    "PolicyBook",
    "PolicyError",
    "PolicySpec",
    "Prediction",
    "Price",
    "Route",
    "Settings",
    "Status",
    "Task",
    "Tier",
    "TiergateClient",
    "TiergateError",
    "TransientError",
    "UnknownDecisionError",
    "UnknownPolicyError",
    "__version__",
    "build_cascade",
    "create_app",
    "decide",
    "example_policy",
    "load_policy",
    "load_policy_book",
    "open_cascade",
    "open_label_store",
    "parse_policy",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'tiergate' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
