"""contrib/grafana/wsd-dashboard.json: Grafana's dashboard schema takes it whole, and its
queries name only metrics, and legends only labels, that wsd really exports.

The schema is grafana-foundation-sdk's Python models, which Grafana generates from its
dashboard schema (CUE): the dashboard is decoded into them and encoded back, so a key the
schema does not know is dropped and shows up as missing; then every decoded field is
checked against the type the model declares (enums and literals included).
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client import CollectorRegistry
from test_metrics import NOW, fake_daemon, store_stats

from wsd.metrics import MetricsState, make_registry

DASHBOARD = Path(__file__).parents[2] / "contrib" / "grafana" / "wsd-dashboard.json"
MODELS = "grafana_foundation_sdk.models."
METRIC = re.compile(r"\b((?:wsd|process)_[a-z0-9_]+)")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture(scope="module")
def decoded(dashboard: dict[str, Any]) -> Dashboard:
    register_default_plugins()  # panel options and Prometheus queries get their models
    return Dashboard.from_json(dashboard)


def not_kept(want: object, got: object, path: str) -> Iterator[str]:
    """Where ``got`` (the round trip) lost or changed something of ``want``."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            yield f"{path}: became {got!r}"
            return
        for key, value in want.items():
            if key not in got:
                yield f"{path}.{key}: not a key of Grafana's dashboard schema"
            else:
                yield from not_kept(value, got[key], f"{path}.{key}")
    elif isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            yield f"{path}: became {got!r}"
            return
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            yield from not_kept(w, g, f"{path}[{i}]")
    elif want != got or isinstance(want, bool) != isinstance(got, bool):
        yield f"{path}: {want!r} became {got!r}"


def type_errors(obj: object, path: str) -> Iterator[str]:
    """Fields of a decoded model whose value is not of the type the model declares."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        yield from check(getattr(obj, name), hint, f"{path}.{name}")


def check(value: object, hint: Any, path: str) -> Iterator[str]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        # Panel options and custom field config: typed by the panel's own model.
        if type(value).__module__.startswith(MODELS):
            yield from type_errors(value, path)
        return
    if origin in (typing.Union, types.UnionType):
        results = [list(check(value, a, path)) for a in args]
        if all(results):
            # Report the member it got furthest into (a panel with one bad
            # option), not that it is neither a Panel nor a RowPanel.
            deep = [r for r in results if not any(e.startswith(f"{path}: ") for e in r)]
            yield from deep[0] if deep else [f"{path}: {value!r} is not a {hint}"]
    elif origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            yield f"{path}: {value!r} is not one of {args}"
    elif origin is list:
        if not isinstance(value, list):
            yield f"{path}: {value!r} is not a list"
        else:
            for i, item in enumerate(value):
                yield from check(item, args[0], f"{path}[{i}]")
    elif origin is dict:
        if not isinstance(value, dict):
            yield f"{path}: {value!r} is not an object"
    elif hint is type(None):
        if value is not None:
            yield f"{path}: {value!r} is not null"
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            hint(value)
        except ValueError:
            yield f"{path}: {value!r} is not one of {[m.value for m in hint]}"
    elif hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if hint is int else int | float):
            yield f"{path}: {value!r} is not a {hint.__name__}"
    elif hint in (str, bool):
        if not isinstance(value, hint):
            yield f"{path}: {value!r} is not a {hint.__name__}"
    elif isinstance(hint, type) and hint.__module__.startswith(MODELS):
        if isinstance(value, dict):  # a field the SDK's decoder passes through raw
            value = hint.from_json(value)  # type: ignore[attr-defined]
        if not isinstance(value, hint):
            yield f"{path}: {value!r} is not a {hint.__name__}"
        else:
            yield from type_errors(value, path)
    elif isinstance(hint, type):  # e.g. a query: the data source's model subclasses it
        if not isinstance(value, hint):
            yield f"{path}: {value!r} is not a {hint.__name__}"
        elif type(value).__module__.startswith(MODELS):
            yield from type_errors(value, path)


def test_grafanas_schema_keeps_every_key(dashboard: dict[str, Any], decoded: Dashboard) -> None:
    again = json.loads(json.dumps(decoded, cls=JSONEncoder))
    assert list(not_kept(dashboard, again, "dashboard")) == []


def test_every_field_has_the_type_grafanas_schema_declares(decoded: Dashboard) -> None:
    assert list(type_errors(decoded, "dashboard")) == []


def test_the_checks_catch_a_wrong_key_and_a_wrong_value(dashboard: dict[str, Any]) -> None:
    bad = json.loads(json.dumps(dashboard))
    i = next(i for i, p in enumerate(bad["panels"]) if p["type"] == "timeseries")
    bad["panels"][i]["fieldconfig"] = {}  # misspelt
    bad["panels"][i]["options"]["legend"]["placement"] = "middle"
    bad["panels"][i]["targets"][0]["format"] = "tables"
    bad["graphTooltip"] = 7
    decoded = Dashboard.from_json(bad)
    lost = list(not_kept(bad, json.loads(json.dumps(decoded, cls=JSONEncoder)), "d"))
    assert lost == [f"d.panels[{i}].fieldconfig: not a key of Grafana's dashboard schema"]
    wrong = list(type_errors(decoded, "d"))
    assert any(w.startswith("d.graph_tooltip: 7") for w in wrong), wrong
    assert any("legend.placement: 'middle'" in w for w in wrong), wrong
    assert any("targets[0].format_val: 'tables'" in w for w in wrong), wrong


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, PromQL expression, legend) of every panel query and variable."""
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["query"], ""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target.get("legendFormat", "")


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Each sample name the exporter produces for the metrics tests' daemon, with its labels."""
    registry: CollectorRegistry = make_registry(fake_daemon(), MetricsState(store_stats(), NOW - 1))
    labels: dict[str, set[str]] = defaultdict(set)
    for family in registry.collect():
        for sample in family.samples:
            labels[sample.name].update(sample.labels)
    return labels


def test_queries_name_only_exported_metrics(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    named = set()
    for title, expr, _ in queries(dashboard):
        names = set(METRIC.findall(expr))
        assert names, f"{title}: no wsd metric in {expr!r}"
        unknown = names - exported.keys()
        assert not unknown, f"{title}: {expr!r} names metrics wsd does not export: {unknown}"
        named |= names
    # Every per-VM family of docs/metrics.md's list is on the dashboard somewhere.
    for family in (
        "wsd_guest_memory_bytes",
        "wsd_resident_memory_bytes",
        "wsd_evicted_memory_bytes",
        "wsd_hot_memory_bytes",
        "wsd_working_set_bytes",
        "wsd_evicted_bytes_total",
        "wsd_fetched_bytes_total",
        "wsd_fault_latency_seconds_bucket",
        "wsd_scan_duration_seconds_bucket",
        "wsd_cycle_duration_seconds_bucket",
        "wsd_sync_window_duration_seconds_bucket",
        "wsd_vcpu_stall_seconds_bucket",
        "wsd_store_stored_bytes",
        "wsd_store_failures_total",
        "wsd_refaults_total",
        "wsd_vm_info",
        "wsd_region_info",
    ):
        assert family in named, family


def test_legends_use_only_labels_their_metrics_have(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    for title, expr, legend in queries(dashboard):
        have = set().union(*(exported[n] for n in METRIC.findall(expr)))
        used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        grouped = {
            label.strip()
            for group in re.findall(r"\bby \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        assert used <= have, f"{title}: legend {legend!r} uses labels {used - have}"
        assert grouped <= have, f"{title}: {expr!r} groups by labels {grouped - have}"


def test_every_panel_queries_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    names = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource"
    assert names["datasource"]["query"] == "prometheus"
    assert names["vm"]["datasource"]["uid"] == "${datasource}"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
