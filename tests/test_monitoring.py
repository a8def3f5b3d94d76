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
from sf_bsread_writer.core.status import prometheus_text
from sf_bsread_writer.web.auth import TokenSet
from sf_bsread_writer.web.state import WebService, WebSettings

from .helpers import ROOT

RULES = ROOT / "monitoring" / "sf_bsread_rules.yml"
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
METRIC = re.compile(r"\b(sf_bsread_(?:buffer|web)_[a-z_]+)")


def _exported() -> dict[str, str]:
    """Every metric family the buffer and the web service export: name -> type."""
    buffer = Buffer("tcp://127.0.0.1:9", rest_port=None)  # not run: its first snapshot is all that is rendered
    text = prometheus_text(buffer.statistics())
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


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian package prometheus; .ci/run installs it)")
def test_promtool_accepts_the_rules():
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
