"""Model versions: the promotion gate, the version store and its shared pointers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from model_copies import GATE_PASSING_CARD, relabelled_copy, renamed_copy
from tiergate.workers.bert.manifest import read_manifest
from tiergate.workers.bert.versions import (
    FilePointers,
    GateResult,
    ModelVersions,
    PointerStore,
    RedisPointers,
    gate,
)
from tiergate.workers.errors import ModelIntegrityError, ModelVersionError, PromotionRefusedError

BETTER_CARD = GATE_PASSING_CARD


def _card(**changes: float) -> dict[str, Any]:
    """BETTER_CARD with ``side__name=value`` figures changed."""
    card = copy.deepcopy(BETTER_CARD)
    for key, value in changes.items():
        side, name = key.split("__")
        card["distillation"][side][name] = value
    return card


def test_gate_passes_a_candidate_as_accurate_and_cheaper() -> None:
    """A candidate within the interval of the current accuracy and with a lower LLM share passes."""
    assert gate(BETTER_CARD) == GateResult(passed=True, reasons=[])


def test_gate_refuses_a_less_accurate_candidate() -> None:
    """A candidate whose interval tops out below the current accuracy is refused, saying so."""
    result = gate(_card(candidate__ci_high=0.78))
    assert not result.passed
    assert len(result.reasons) == 1
    assert "less accurate" in result.reasons[0]


def test_gate_accepts_accuracy_equal_to_the_interval_top() -> None:
    """The accuracy check is inclusive: ci_high equal to the current accuracy passes."""
    assert gate(_card(candidate__ci_high=0.80)).passed


def test_gate_refuses_a_candidate_that_saves_no_llm_calls() -> None:
    """An equal or higher LLM share is refused, naming both shares."""
    result = gate(_card(candidate__llm_share=0.42))
    assert not result.passed
    assert "0.420" in result.reasons[0]


def test_gate_lists_every_failed_check() -> None:
    """A candidate worse on both counts gets two reasons."""
    result = gate(_card(candidate__ci_high=0.5, candidate__llm_share=0.9))
    assert not result.passed
    assert len(result.reasons) == 2


def test_gate_refuses_a_card_without_held_out_figures() -> None:
    """A card with no distillation block does not pass: it has no held-out figures."""
    result = gate({"name": "trained-once"})
    assert not result.passed
    assert "no held-out figures" in result.reasons[0]


@pytest.mark.parametrize("missing", ["ci_high", "llm_share"])
def test_gate_refuses_a_card_with_a_missing_figure(missing: str) -> None:
    """A distillation block lacking a figure the gate reads is refused, naming the figure."""
    card = copy.deepcopy(BETTER_CARD)
    del card["distillation"]["candidate"][missing]
    result = gate(card)
    assert not result.passed
    assert f"candidate.{missing}" in result.reasons[0]


# ------------------------------------------------------------------------------- the store


@pytest.fixture(params=["file", "redis"])
def versions(request, tiny_model: Path, tmp_path: Path, redis_prefix: str) -> ModelVersions:
    """An empty version store, its pointers in a JSON file or in the local Redis."""
    store = tmp_path / "store"
    pointers: PointerStore
    if request.param == "redis":
        pointers = RedisPointers(redis.Redis(host="127.0.0.1", port=6379), redis_prefix)
    else:
        pointers = FilePointers(store)
    return ModelVersions(store, pointers, fallback_dir=tiny_model)


@pytest.fixture
def better(tiny_model: Path, tmp_path: Path) -> Path:
    """A candidate whose card passes the gate."""
    return renamed_copy(tiny_model, tmp_path / "better", "tiny-better", BETTER_CARD)


@pytest.fixture
def worse(tiny_model: Path, tmp_path: Path) -> Path:
    """A candidate whose card fails the gate (less accurate, no cheaper)."""
    card = _card(candidate__ci_high=0.7, candidate__llm_share=0.5)
    return renamed_copy(tiny_model, tmp_path / "worse", "tiny-worse", card)


def test_add_copies_a_verified_model_in_under_its_version(versions, better) -> None:
    """``add`` returns the manifest's version and the copy loads from ``path(version)``."""
    version = versions.add(better)
    assert version == "tiny-better"
    assert versions.path(version) == versions.store / "tiny-better"
    assert read_manifest(versions.path(version)).model_version == version
    assert versions.add(better) == version, "adding it again changes nothing"
    assert versions.versions() == [version]


def test_add_refuses_a_directory_whose_files_do_not_match_its_manifest(versions, better) -> None:
    """A tampered model is not added, and nothing is left in the store."""
    (better / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelIntegrityError):
        versions.add(better)
    assert versions.versions() == []


def test_nothing_promoted_serves_the_configured_model(versions, tiny_model) -> None:
    """Before any promotion, ``current`` is None and ``current_dir`` the fallback model."""
    assert versions.current() is None
    assert versions.current_dir() == tiny_model


def test_unknown_version_is_a_clear_error(versions) -> None:
    """A version not in the store is named in the error, with the way to add one."""
    with pytest.raises(ModelVersionError, match="unknown model version 'nope'"):
        versions.promote("nope")
    with pytest.raises(ModelVersionError, match="not a model version name"):
        versions.path("../escape")


def test_promote_refuses_a_worse_candidate_and_names_the_reasons(versions, worse) -> None:
    """The gate refuses: the error lists its reasons and the pointer does not move."""
    version = versions.add(worse)
    with pytest.raises(PromotionRefusedError) as refused:
        versions.promote(version)
    assert "less accurate" in str(refused.value)
    assert "fewer messages to the LLM" in str(refused.value)
    assert versions.current() is None
    assert versions.audit() == []


def test_promote_refuses_a_card_without_held_out_figures(versions, tiny_model, tmp_path) -> None:
    """A model trained once (no distillation block) is not promoted without --force."""
    version = versions.add(renamed_copy(tiny_model, tmp_path / "plain", "tiny-plain"))
    with pytest.raises(PromotionRefusedError, match="no held-out figures"):
        versions.promote(version)


def test_promote_then_rollback_returns_to_the_model_served_before(
    versions, better, tiny_model
) -> None:
    """The first promotion keeps the fallback model in the store; rollback returns to it."""
    base = read_manifest(tiny_model).model_version
    version = versions.add(better)
    assert versions.promote(version).passed
    assert versions.current() == version
    assert versions.current_dir() == versions.store / version
    assert versions.pointers.read().previous == (base,)
    assert versions.rollback() == base
    assert versions.current() == base
    with pytest.raises(ModelVersionError, match="no previous model version"):
        versions.rollback()
    actions = [(e.action, e.version, e.replaced) for e in versions.audit()]
    assert actions == [("promote", version, base), ("rollback", base, version)]


def test_promoting_the_version_serving_is_refused(versions, better) -> None:
    """Promoting the current version again is an error, not a second stack entry."""
    version = versions.add(better)
    versions.promote(version)
    with pytest.raises(ModelVersionError, match="already serving"):
        versions.promote(version)
    assert len(versions.pointers.read().previous) == 1


def test_forced_promotion_is_logged_and_audited_with_the_reasons(versions, worse) -> None:
    """--force promotes a refused candidate; a warning event and the audit entry keep why."""
    version = versions.add(worse)
    with capture_logs() as logs:
        result = versions.promote(version, force=True)
    assert not result.passed
    assert versions.current() == version
    forced = [e for e in logs if e["event"] == "model.promotion_forced"]
    assert len(forced) == 1
    assert forced[0]["log_level"] == "warning"
    assert forced[0]["reasons"] == result.reasons
    entry = versions.audit()[-1]
    assert entry.forced
    assert entry.reasons == result.reasons


def test_shadow_sets_and_clears_the_candidate_and_promotion_takes_it(versions, better) -> None:
    """The shadow pointer names the candidate until it is promoted or cleared."""
    version = versions.add(better)
    versions.shadow(version)
    assert versions.pointers.read().shadow == version
    versions.clear_shadow()
    assert versions.pointers.read().shadow is None
    versions.shadow(version)
    versions.promote(version)
    assert versions.pointers.read().shadow is None
    with pytest.raises(ModelVersionError, match="already serving"):
        versions.shadow(version)


def test_a_model_with_other_labels_is_neither_shadowed_nor_promoted(
    versions, tiny_model, tmp_path
) -> None:
    """Labels that differ from the serving model's are refused: the policies would not fit."""
    other = relabelled_copy(tiny_model, tmp_path / "other", ("cats", "dogs", "fish"))
    version = versions.add(other)
    with pytest.raises(ModelVersionError, match="has the labels"):
        versions.shadow(version)
    with pytest.raises(ModelVersionError, match="has the labels"):
        versions.promote(version, force=True)


def test_pointers_survive_a_new_store_object(versions, better) -> None:
    """The pointers live outside the object: a second one (another process) reads the same."""
    version = versions.add(better)
    versions.promote(version)
    again = ModelVersions(versions.store, versions.pointers, versions.fallback_dir)
    assert again.current() == version
