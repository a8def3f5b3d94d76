"""monitoring/: the Prometheus rules pass promtool, and every metric the rules and the Grafana dashboard
query is one the buffer or the web service exports (read from the code that renders /metrics).
Metric names follow Prometheus' conventions: counters end in _total, no per-session series outlive a session."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from sf_bsread_writer.buffer.service import Buffer
from sf_bsread_writer.buffer.settings import BufferSettings
from sf_bsread_writer.status import prometheus_text
from sf_bsread_writer.web.auth import TokenSet
from sf_bsread_writer.web.state import WebService, WebSettings

from .helpers import ROOT

RULES = ROOT / "monitoring" / "sf_bsread_rules.yml"
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
METRIC = re.compile(r"\b(sf_bsread_(?:buffer|web)_[a-z_]+)")


def _exported() -> dict[str, str]:
    """Every metric family the buffer and the web service export: name -> type."""
    from dataclasses import replace

    from sf_bsread_writer.status import ArchiveStatus

    buffer = Buffer(BufferSettings("tcp://127.0.0.1:9", rest_port=None))  # not run: its first snapshot is all that is rendered
    archive = ArchiveStatus("nats://127.0.0.1:9/B", "sfbs_B", "archiving", lag_seconds=0.0)  # --archive's lines
    text = prometheus_text(replace(buffer.statistics(), archive=archive))
    text += WebService(WebSettings("tcp://127.0.0.1:9", "http://127.0.0.1:9", "tcp://127.0.0.1:9"),
                       TokenSet()).metrics_text()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def test_metric_names_follow_prometheus_conventions():
    exported = _exported()
    assert "sf_bsread_buffer_child_up" in exported and "sf_bsread_web_values_dropped_total" in exported
    for name, kind in exported.items():
        assert (kind == "counter") == name.endswith("_total"), name
        assert not name.endswith("_rate"), f"{name}: give the unit (per_second)"


def test_rules_and_dashboard_query_only_exported_metrics():
    exported = _exported()
    queried = set(METRIC.findall(RULES.read_text(encoding="utf-8")))
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    expressions.append(dashboard["templating"]["list"][1]["query"]["query"])
    for expression in expressions:
        queried |= set(METRIC.findall(expression))
    assert len(queried) > 15
    assert sorted(queried - set(exported)) == []


def _exported_labels() -> dict[str, set[str]]:
    """Metric name -> the labels its samples carry, with a child and a replay session in the status (an
    unstarted buffer has neither, and their metrics would show no sample)."""
    from dataclasses import replace

    from sf_bsread_writer.status import ArchiveStatus, ChildStatus, SessionStatus

    status = Buffer(BufferSettings("tcp://127.0.0.1:9", rest_port=None)).statistics()
    session = SessionStatus("0a1b", 1, None, 9, None, 0, 5, 5, 0, 0, 64, 0, 0, None)
    status = replace(status, children=(ChildStatus("web", True, 0),),  # a buffer that has run a while
                     replay=replace(status.replay, sessions=(session,), active_sessions=1),
                     ring=replace(status.ring, oldest_time=1.0, newest_time=2.0),
                     source=replace(status.source, idle_seconds=0.5), channels=12,
                     archive=ArchiveStatus("nats://127.0.0.1:9/B", "sfbs_B", "archiving", lag_seconds=0.0,
                                           lag_messages=0, first_pulse_id=1, last_pulse_id=2, discarded=0))
    text = prometheus_text(status)
    text += WebService(WebSettings("tcp://127.0.0.1:9", "http://127.0.0.1:9", "tcp://127.0.0.1:9"),
                       TokenSet()).metrics_text()
    labels: dict[str, set[str]] = {}
    for name, inside in re.findall(r"^(sf_bsread_\w+?)(?:\{(.*)\})? \S+$", text, flags=re.M):
        labels.setdefault(name, set()).update(re.findall(r'(\w+)="', inside))
    return labels


def test_rules_and_dashboard_use_only_labels_the_metrics_carry():
    """A selector, a ``by (...)`` or an alert text naming a label the metric lacks matches nothing or shows
    an empty string: the alert never fires, or fires saying nothing. Prometheus adds job and instance."""
    labels = _exported_labels()
    scrape = {"job", "instance"}
    rules = RULES.read_text(encoding="utf-8")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    alerts = [(expr, block) for block in rules.split("- alert:")[1:]
              for expr in re.findall(r"expr: (.+)", block)]
    checked = 0
    for expression in expressions + [expr for expr, _ in alerts]:
        metrics = METRIC.findall(expression)
        carried = set().union(*(labels.get(name, set()) for name in metrics)) | scrape
        for name, selector in re.findall(r"(sf_bsread_\w+)\{([^}]*)\}", expression):
            used = set(re.findall(r"(\w+)\s*[=!~]", selector))
            assert used <= labels[name] | scrape, (expression, used - labels[name])
            checked += 1
        for grouped in re.findall(r"\bby\s*\(([^)]*)\)", expression):
            used = {label.strip() for label in grouped.split(",")}
            assert used <= carried, (expression, used - carried)
            checked += 1
    for expr, block in alerts:
        grouped = re.findall(r"\bby\s*\(([^)]*)\)", expr)
        result = ({label.strip() for label in grouped[-1].split(",")} if grouped else
                  set().union(*(labels.get(name, set()) for name in METRIC.findall(expr))) | scrape)
        for label in re.findall(r"\$labels\.(\w+)", block):
            assert label in result, (expr, label)
            checked += 1
    variable = dashboard["templating"]["list"][1]["query"]["query"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable).groups()
    assert label in labels[metric]
    assert checked > 30


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian package prometheus; .ci/run installs it)")
def test_promtool_accepts_the_rules():
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
