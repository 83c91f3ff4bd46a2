"""Tests for the records layer: the Prefect vocabulary pinned to prefect-client, and records."""

from __future__ import annotations

import prefect.states
import pytest
from prefect.client.schemas import objects

from exporter.records import (
    DELAY_BUCKETS,
    IN_FLIGHT_STATE_TYPES,
    KNOWN_STATE_NAMES,
    SLOT_HOLDING_STATE_TYPES,
    TERMINAL_STATE_NAMES,
    TERMINAL_STATE_TYPES,
    ConcurrencyLimitRecord,
    HistogramState,
    LimitKind,
    PoolSelector,
    StateName,
    StateType,
    WorkPoolStatus,
    WorkQueueStatus,
)


class TestPrefectVocabulary:
    """The records' spelling of Prefect's states and statuses is prefect-client's own."""

    def test_state_types_are_prefects(self) -> None:
        """Every state type, and only those, with the same values."""
        assert [t.value for t in StateType] == [t.value for t in objects.StateType]

    def test_terminal_state_types_are_prefects(self) -> None:
        """The terminal set is prefect-client's TERMINAL_STATES."""
        assert {t.value for t in TERMINAL_STATE_TYPES} == {t.value for t in objects.TERMINAL_STATES}

    @pytest.mark.parametrize("name", list(StateName), ids=str)
    def test_each_state_name_has_prefects_type(self, name: StateName) -> None:
        """prefect.states builds a state of that name with the type the records give it."""
        state = getattr(prefect.states, name.value)()
        assert state.name == name.value
        assert state.type.value == name.state_type.value

    def test_known_names_are_the_non_terminal_ones_in_export_order(self) -> None:
        """The closed set of exported names is every non-terminal name; the rest are terminal."""
        assert [n.value for n in KNOWN_STATE_NAMES] == [
            "Scheduled",
            "Late",
            "AwaitingRetry",
            "AwaitingConcurrencySlot",
            "Pending",
            "Submitting",
            "InfrastructurePending",
            "Running",
            "Retrying",
            "Paused",
            "Suspended",
            "Cancelling",
        ]
        assert not {n.state_type for n in KNOWN_STATE_NAMES} & TERMINAL_STATE_TYPES
        assert set(KNOWN_STATE_NAMES) | TERMINAL_STATE_NAMES == set(StateName)
        assert {n.value for n in TERMINAL_STATE_NAMES} == {
            "Completed",
            "Failed",
            "Crashed",
            "Cancelled",
        }

    def test_slot_holding_types_are_not_terminal(self) -> None:
        """Runs holding a pool, queue or deployment slot are never finished."""
        assert IN_FLIGHT_STATE_TYPES <= SLOT_HOLDING_STATE_TYPES
        assert not SLOT_HOLDING_STATE_TYPES & TERMINAL_STATE_TYPES

    def test_statuses_are_prefects(self) -> None:
        """Pool and queue statuses are prefect-client's, in the order they are exported."""
        assert [s.value for s in WorkPoolStatus] == [s.value for s in objects.WorkPoolStatus]
        assert [s.value for s in WorkQueueStatus] == [s.value for s in objects.WorkQueueStatus]

    def test_enum_members_compare_as_plain_strings(self) -> None:
        """API data arrives as str; the enums must match it in sets and dict keys."""
        assert "AwaitingConcurrencySlot" in {StateName.AWAITING_CONCURRENCY_SLOT}
        by_type: dict[str, int] = {StateType.RUNNING: 1}
        assert by_type.get("RUNNING") == 1
        assert str(LimitKind.TAG) == "tag"


def limit(name: str) -> ConcurrencyLimitRecord:
    return ConcurrencyLimitRecord(id="id", name=name, limit=3, active_slots=1, active=True)


class TestConcurrencyLimitRecord:
    """The kind, tag, deployment and display name come from the limit's name, parsed once."""

    @pytest.mark.parametrize(
        ("name", "kind", "tag", "deployment_id"),
        [
            ("warehouse", LimitKind.GLOBAL, None, None),
            ("tag:reports", LimitKind.TAG, "reports", None),
            ("deployment:5f1c", LimitKind.DEPLOYMENT, None, "5f1c"),
            ("tagged", LimitKind.GLOBAL, None, None),
            ("deployment", LimitKind.GLOBAL, None, None),
        ],
    )
    def test_kind_and_target_from_the_prefix(
        self, name: str, kind: LimitKind, tag: str | None, deployment_id: str | None
    ) -> None:
        """Only the exact `tag:` and `deployment:` prefixes make tag and deployment limits."""
        record = limit(name)
        assert record.kind is kind
        assert record.tag == tag
        assert record.deployment_id == deployment_id

    def test_deployment_limits_are_shown_by_deployment_name(self) -> None:
        """The opaque id is replaced by `flow/deployment` when the name is known."""
        record = limit("deployment:5f1c")
        assert record.deployment_name({"5f1c": "etl/nightly"}) == "etl/nightly"
        assert record.display_name({"5f1c": "etl/nightly"}) == "deployment:etl/nightly"

    def test_an_unknown_deployment_keeps_its_id(self) -> None:
        """Without a name (deleted deployment, names not read) the id is shown."""
        record = limit("deployment:5f1c")
        assert record.deployment_name({}) == "5f1c"
        assert record.display_name({}) == "deployment:5f1c"

    def test_other_kinds_keep_their_name_and_have_no_deployment(self) -> None:
        """Global and tag limits are shown as Prefect names them."""
        for name in ("warehouse", "tag:reports"):
            assert limit(name).display_name({"5f1c": "etl/nightly"}) == name
            assert limit(name).deployment_name({}) is None


class TestHistogramState:
    """Buckets are cumulative, as the exposition needs."""

    def test_observe(self) -> None:
        """A 45 s wait lands in the 60 s bucket and every larger one."""
        state = HistogramState().observe(45)
        bounds = dict(zip((*DELAY_BUCKETS, float("inf")), state.buckets, strict=True))
        assert bounds[30] == 0
        assert bounds[60] == 1
        assert bounds[float("inf")] == 1
        assert state.count == 1


class TestPoolSelector:
    """Shard selection by work pool name: globs, exclusion winning, everything by default."""

    def test_no_patterns_select_every_pool(self) -> None:
        """The default exporter watches the whole workspace."""
        assert PoolSelector().selects("anything")

    def test_include_and_exclude_globs(self) -> None:
        """`etl-*` but not `etl-test-*`; names are matched case-sensitively, as Prefect's."""
        selector = PoolSelector(include=("etl-*", "k8s-?"), exclude=("etl-test-*",))
        assert selector.selects("etl-prod")
        assert selector.selects("k8s-a")
        assert not selector.selects("etl-test-1")
        assert not selector.selects("ETL-prod")
        assert not selector.selects("k8s-ab")
