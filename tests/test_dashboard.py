"""The Grafana dashboard and the prometheus-operator monitors of the chart.

The dashboard's PromQL is parsed (promql-parser) for the metric names it
queries, and every one must be exported by the real adapter or the real Results
Service of `clara-dicom up` after traffic through all of it: a study received
and grouped into a job, a result exported to dcmtk's storescp."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from local_setup import write_config
from peers import REPO, StoreSCP, metric_value, storescu, wait_for
from test_chart import by_kind, needs_helm, render

DASHBOARD = REPO / "charts" / "clara-dicom" / "dashboards" / "clara-dicom.json"
# Grafana replaces these before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*", "${namespace}": ".*"}
# Counters that only have samples once something went wrong; they must still be declared.
FAILURE_ONLY = {"clara_store_failures_total", "clara_job_creation_failures_total", "clara_instances_ignored_total"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict) -> list[str]:
    out = []
    for panel in dash["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
    return out


def metric_names(expr: str) -> set[str]:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr}"
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def queried_names() -> set[str]:
    return set().union(*(metric_names(e) for e in queries(dashboard())))


def test_dashboard_is_well_formed():
    dash = dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] == "clara-dicom"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "namespace"}
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert '{namespace=~"$namespace"}' in target["expr"], target["expr"]


def test_dashboard_has_the_panels_operators_ask_for():
    names = queried_names()
    for needed in ("clara_associations_total", "clara_instances_received_total", "clara_groups_open",
                   "clara_job_creation_latency_seconds_bucket", "clara_export_results_total",
                   "clara_results_tasks", "clara_stow_requests_total"):
        assert needed in names, needed


def test_metric_names_are_found_in_promql():
    assert metric_names('histogram_quantile(0.9, sum by (le) (rate(a_bucket{namespace=~"$namespace"}'
                        '[$__rate_interval]))) / on() b + sum(c offset 5m)') == {"a_bucket", "b", "c"}


def stow_one(port: int, path: Path, ae_title: str, token: str) -> None:
    """One instance by STOW-RS (calling AE DICOMWEB must be a ClaraSource)."""
    import http.client

    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n--b--\r\n"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", f"/dicomweb/aetitles/{ae_title}/studies", body=body, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=b', "Authorization": f"Bearer {token}"})
    rsp = conn.getresponse()
    assert rsp.status == 200, rsp.read()
    conn.close()


def exported(text: str) -> tuple[set[str], set[str]]:
    """(names declared by the exposition, names that have samples)."""
    declared, sampled = set(), set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "summary": ["_sum", "_count", ""]}.get(family.type, [""])
        declared |= {family.name + s for s in suffixes}
        sampled |= {s.name for s in family.samples}
    return declared, sampled


@pytest.mark.dcmtk
def test_every_metric_the_dashboard_queries_is_exported(local_adapter, tmp_path):
    from clara_dicom.synthetic import write_study

    scp = StoreSCP(tmp_path / "scp")
    try:
        config = write_config(tmp_path / "config", ae="DASH", processor="timeout: 5\npipelines: {seg: seg}",
                              extra=f"""
---
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraDestination
metadata: {{name: pacs}}
spec: {{aeTitle: ANY-SCP, host: 127.0.0.1, port: {scp.port}}}
---
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraSource
metadata: {{name: dicomweb}}
spec: {{aeTitle: DICOMWEB, host: 127.0.0.1}}
""")
        adapter = local_adapter(config, results=True, env={**os.environ, "CLARA_EXPORT_POLL_SECONDS": "0.1",
                                                           "CLARA_STOW_TOKEN": "dash"})
        files = write_study(tmp_path / "study", slices=3, rows=16, cols=16)
        storescu(files[1:], adapter.dicom_port, called="DASH", calling="STORESCU")
        stow_one(adapter.http_port, files[0], "DASH", "dash")
        storescu(files[:1], adapter.dicom_port, called="NOPE", calling="STORESCU", check=False)  # rejected
        wait_for(adapter.jobs, 30, what="the pipeline job")

        # the pipeline's result goes back out through the Results Service and the export agent
        payload = adapter.state / "payloads" / "job-1-payload"
        out = payload / "operators" / "seg" / "output"
        out.mkdir(parents=True)
        for f in files:
            shutil.copy(f, out / f.name)
        token = (adapter.state / "results-token").read_text().strip()
        url = f"http://127.0.0.1:{adapter.results_port}"
        env = {**os.environ, "CLARA_JOB_ID": "job-1", "CLARA_PIPELINE_ID": "seg", "CLARA_PAYLOAD_ID": "job-1-payload",
               "CLARA_OPERATOR": "seg", "CLARA_PAYLOAD_ROOT": str(payload), "CLARA_RESULTS_URL": url,
               "CLARA_RESULTS_TOKEN": token}
        res = subprocess.run([sys.executable, "-m", "clara_dicom.cli", "register-results", "--agent", "ClaraSCU",
                              "--data", '["pacs"]', "--input", str(out)], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: metric_value(adapter.metrics(), "clara_export_results_total", outcome="succeeded") == 1,
                 30, what="the export")

        request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as rsp:
            results_text = rsp.read().decode()
        adapter_text = adapter.metrics()
    finally:
        scp.stop()

    declared_a, sampled_a = exported(adapter_text)
    declared_r, sampled_r = exported(results_text)
    names = queried_names()
    missing = names - declared_a - declared_r
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    silent = names - FAILURE_ONLY - sampled_a - sampled_r
    assert not silent, f"exported but without samples after traffic: {sorted(silent)}"
    assert re.search(r'clara_results_tasks\{state="Succeeded"\} 1\.0', results_text), results_text


@needs_helm
def test_dashboard_configmap_and_monitors_are_off_by_default():
    docs = render()
    assert not [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert not [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com")]


@needs_helm
def test_dashboard_configmap_for_grafanas_sidecar():
    docs = render("--set", "monitoring.dashboard.enabled=true", "--set", "monitoring.dashboard.namespace=grafana")
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "grafana"
    assert json.loads(cm["data"]["clara-dicom.json"]) == dashboard()


@needs_helm
@pytest.mark.parametrize("kind,endpoints", [("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")])
def test_monitors_scrape_adapter_and_results_service(kind, endpoints):
    docs = render("--set", "monitoring.serviceMonitor.enabled=true", "--set", f"monitoring.serviceMonitor.kind={kind}",
                  "--set", "monitoring.serviceMonitor.labels.release=prometheus")
    monitors = {d["metadata"]["name"].rsplit("-", 1)[1]: d for d in by_kind(docs, kind)}
    assert set(monitors) == {"adapter", "results"}
    for component, mon in monitors.items():
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert mon["metadata"]["labels"]["release"] == "prometheus"
        assert mon["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
        (ep,) = mon["spec"][endpoints]
        assert ep["port"] == "http" and ep["path"] == "/metrics"
    # the Results Service's metrics need its token: by reference to the chart's Secret
    auth = monitors["results"]["spec"][endpoints][0]["authorization"]
    secret = by_kind(docs, "Secret")[0]
    assert auth == {"type": "Bearer", "credentials": {"name": secret["metadata"]["name"], "key": "token"}}
    assert "authorization" not in monitors["adapter"]["spec"][endpoints][0]
