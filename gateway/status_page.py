"""The gateway's status page: the fleet snapshot as one self-refreshing HTML page.

Plain server-rendered HTML (no scripts, no external assets), so it works anywhere a
browser can reach the gateway; every value from Redis is escaped.
"""

from __future__ import annotations

import time
from html import escape

from corral import humanize
from corral.snapshot import NodeStatus, QueueStatus, Snapshot

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } td, th { padding: .25em .8em; text-align: left;
  border-bottom: 1px solid #ddd; vertical-align: top; } th { background: #f4f4f4; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b00; font-weight: 600; } .ok { color: #070; } .muted { color: #777; }
.bar { display: inline-block; height: .7em; background: #4a7; vertical-align: middle; }
.track { display: inline-block; width: 6em; height: .7em; background: #e4e4e4; }
"""


def render(snapshot: Snapshot, *, gateway_id: str, waiting: int, refresh: int = 2) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snapshot.taken_at))
    live = sum(1 for n in snapshot.nodes if n.state not in ("stale", "gone"))
    slots = sum(int(n.record.get("slots_total") or 0) for n in snapshot.nodes)
    busy = sum(int(n.record.get("slots_busy") or 0) for n in snapshot.nodes)
    queued = sum(q.queued for q in snapshot.queues)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<meta http-equiv='refresh' content='{refresh}'>",
        f"<title>Corral: {queued} queued, {busy}/{slots} slots busy</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Corral</h1>",
        f"<p class='muted'>Read from Redis at {escape(when)} by gateway "
        f"<code>{escape(gateway_id)}</code>, which holds {waiting} waiting request(s); "
        f"{snapshot.gateways} gateway(s) live. Refreshes every {refresh} s. "
        "Also: <a href='/metrics'>/metrics</a> (Prometheus), "
        "<a href='/nodes'>/nodes</a>, <a href='/healthz'>/healthz</a>.</p>",
        _summary(live, len(snapshot.nodes), busy, slots, queued, snapshot),
        "<h2>Nodes</h2>",
        _nodes(snapshot.nodes),
        "<h2>Queues</h2>",
        _queues(snapshot.queues),
        "<h2>Counters</h2>",
        _counters(snapshot.stats),
        "</body></html>",
    ]
    return "".join(parts)


def _summary(live: int, nodes: int, busy: int, slots: int, queued: int, snapshot: Snapshot) -> str:
    retries = snapshot.retries
    dead = retries.dead_letters
    load = snapshot.load
    rows = [
        ("nodes live", f"{live} of {nodes}", live < nodes),
        ("slots busy", f"{busy} of {slots}", False),
        ("jobs queued", str(queued), False),
        ("retries waiting", f"{retries.inbox + retries.scheduled}", False),
        ("dead letters", str(dead), dead > 0),
        (
            "degradation level",
            f"{load.level} ({load.name}), load {load.load:.2f}, expected wait {load.wait:.1f} s",
            load.level > 0,
        ),
    ]
    cells = "".join(
        f"<tr><th>{escape(name)}</th><td class='num{' bad' if bad else ''}'>{escape(value)}"
        "</td></tr>"
        for name, value, bad in rows
    )
    return f"<table>{cells}</table>"


def _nodes(nodes: list[NodeStatus]) -> str:
    if not nodes:
        return "<p class='muted'>No worker has sent a heartbeat.</p>"
    head = (
        "<tr><th>node</th><th>state</th><th>slots</th><th>models (loaded in bold)</th>"
        "<th>CPU</th><th>memory</th><th>GPUs</th><th>heartbeat</th></tr>"
    )
    return f"<table>{head}{''.join(_node_row(n) for n in nodes)}</table>"


def _node_row(node: NodeStatus) -> str:
    rec = node.record
    total = int(rec.get("slots_total") or 0)
    busy = int(rec.get("slots_busy") or 0)
    width = 0 if not total else round(6 * busy / total, 2)
    state_class = "ok" if node.state == "running" else "bad"
    loaded = set(humanize.model_names(rec.get("loaded")))
    models = ", ".join(
        f"<b>{escape(m)}</b>" if m in loaded else escape(m)
        for m in humanize.model_names(rec.get("models"))
    )
    return (
        f"<tr><td><code>{escape(node.node_id)}</code><br><span class='muted'>"
        f"{escape(str(rec.get('ollama_url', '')))}</span></td>"
        f"<td class='{state_class}'>{escape(node.state)}</td>"
        f"<td class='num'>{busy}/{total} <span class='track'><span class='bar' "
        f"style='width:{width}em'></span></span></td>"
        f"<td>{models or '-'}</td>"
        f"<td class='num'>{humanize.percent(rec.get('cpu_percent'))}</td>"
        f"<td class='num'>{escape(humanize.memory(rec.get('mem')))}</td>"
        f"<td>{escape(humanize.gpus(rec.get('gpus')))}</td>"
        f"<td class='num'>{node.heartbeat_age:.1f} s ago</td></tr>"
    )


def _queues(queues: list[QueueStatus]) -> str:
    if not queues:
        return "<p class='muted'>No job was ever queued.</p>"
    head = "<tr><th>model</th><th>queued</th><th>running</th><th>by priority (0 first)</th></tr>"
    rows = []
    for queue in queues:
        running = sum(s.pending for s in queue.streams)
        waiting = [s for s in queue.streams if s.pending or s.length]
        detail = ", ".join(
            f"p{s.priority}: {s.pending} running, {s.length} in stream" for s in waiting
        )
        rows.append(
            f"<tr><td><code>{escape(queue.model)}</code></td>"
            f"<td class='num'>{queue.queued}</td><td class='num'>{running}</td>"
            f"<td class='muted'>{escape(detail) or '-'}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _counters(stats: dict[str, int]) -> str:
    if not stats:
        return "<p class='muted'>None yet.</p>"
    cells = "".join(
        f"<tr><th>{escape(name)}</th><td class='num'>{value:,}</td></tr>"
        for name, value in stats.items()
    )
    return f"<table>{cells}</table>"
