"""deploy/grafana/corral.json: a dashboard Grafana's import accepts, whose every query
names a metric that Corral's /metrics exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import orjson
from prometheus_client.parser import text_string_to_metric_families

from corral.tooling.cluster import LocalCluster
from tests.helpers import until_value

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "corral.json"
METRIC = re.compile(r"\bcorral_[a-z_]+\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}

_TARGET = {
    "type": "object",
    "required": ["refId", "expr"],
    "properties": {"refId": {"type": "string"}, "expr": {"type": "string", "minLength": 1}},
}
_GRID = {
    "type": "object",
    "required": ["h", "w", "x", "y"],
    "properties": {
        "h": {"type": "integer", "minimum": 1},
        "w": {"type": "integer", "minimum": 1, "maximum": 24},
        "x": {"type": "integer", "minimum": 0, "maximum": 23},
        "y": {"type": "integer", "minimum": 0},
    },
}
SCHEMA: dict[str, Any] = {
    # What Grafana's "Import dashboard" needs of the JSON model (its documented fields).
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "__inputs"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 30},
        "id": {"type": "null"},
        "__inputs": {
            "type": "array",
            "items": {"type": "object", "required": ["name", "type", "pluginId"]},
        },
        "templating": {
            "type": "object",
            "required": ["list"],
            "properties": {
                "list": {"type": "array", "items": {"type": "object", "required": ["name", "type"]}}
            },
        },
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["id", "type", "title", "gridPos"],
                "properties": {
                    "id": {"type": "integer"},
                    "type": {"enum": ["row", "timeseries", "stat"]},
                    "title": {"type": "string", "minLength": 1},
                    "gridPos": _GRID,
                    "targets": {"type": "array", "items": _TARGET},
                },
            },
        },
    },
}


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = orjson.loads(DASHBOARD.read_bytes())
    return dashboard


def test_the_dashboard_has_grafanas_import_shape() -> None:
    dashboard = load()
    jsonschema.validate(dashboard, SCHEMA)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
    declared = {i["name"] for i in dashboard["__inputs"]}
    assert declared == {"DS_PROMETHEUS"}
    # Panels that share a row never overlap.
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
    for expr in queries(dashboard):
        assert expr.count("(") == expr.count(")"), expr


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    return exprs


async def test_every_query_names_a_metric_corral_exports(cluster: LocalCluster) -> None:
    async with (
        ollama.AsyncClient(host=cluster.url) as client,
        httpx.AsyncClient(base_url=cluster.url, timeout=10) as http,
    ):
        await client.generate(model="llama3", prompt="hi", options={"num_predict": 2})

        async def exported() -> set[str]:
            text = (await http.get("/metrics")).text
            # Every family the exposition declares, with the sample names its type gives
            # (a family with no sample yet, such as GPU figures on a host without one, is
            # still declared).
            names: set[str] = set()
            sampled: set[str] = set()
            for family in text_string_to_metric_families(text):
                suffixes = SUFFIXES.get(family.type, ("",))
                names |= {family.name + suffix for suffix in suffixes}
                sampled |= {sample.name for sample in family.samples}
            flushed = {"corral_generated_tokens_total", "corral_requests_total"} <= sampled
            return names if flushed else set()

        names = await until_value(exported)
    used = {name for expr in queries(load()) for name in METRIC.findall(expr)}
    assert used, "the dashboard queries no Corral metric"
    assert used <= names, f"not exported: {sorted(used - names)}"
    # The dashboard covers the fleet, the nodes, the models and the queues.
    titles = {p["title"] for p in load()["panels"] if p["type"] == "row"}
    assert titles == {"Fleet overview", "Per node", "Per model", "Queues"}
