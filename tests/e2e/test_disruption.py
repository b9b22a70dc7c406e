"""A pipeline pod evicted or preempted is not a failed run (issue 16, at scale): the
Job's podFailurePolicy ignores pods the control plane ended with a DisruptionTarget
condition, so the Job starts the run again and the PipelineJob succeeds. Real
kube-apiserver (its Eviction API sets the condition), real Job controller, pods
played by kwok (its pod-terminate stage ends a deleted pod Failed, as a kubelet does)."""
from __future__ import annotations

import pytest

import k8s_cluster as kc
from test_operator import Rest, wait_for
from test_pipelines import LIVER, operators, phase, priority_classes  # noqa: F401 (fixtures)
from test_pipelines import jobs, pipelinejob

pytestmark = pytest.mark.e2e


@pytest.fixture
def rest(k8s_cluster) -> Rest:
    return Rest(k8s_cluster)


def pods_of(rest: Rest, ns: str, job: str) -> list[dict]:
    return rest.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name%3D{job}")["items"]


def test_an_evicted_pipeline_pod_runs_again_and_the_pipelinejob_succeeds(k8s_cluster, k8s_namespace, rest,
                                                                         operators, priority_classes):
    if not k8s_cluster.kwok:
        pytest.skip("pod outcomes are kwok's stages")
    ns = k8s_namespace
    k8s_cluster.kubectl("apply", "-n", ns, "-f", str(LIVER))
    operators("--no-adapter-feedback", "--payload-host-path", "/tmp/clara-dicom-e2e-payloads",
              "--pod-annotation", f"{kc.OUTCOME_ANNOTATION}=hold")
    k8s_cluster.apply(pipelinejob("liver-evict", "liver-tumor-example"), namespace=ns)
    first = wait_for(lambda: [p for p in pods_of(rest, ns, "liver-evict") if p["status"].get("phase") == "Running"],
                     60, "the pipeline pod running", interval=0.2)[0]["metadata"]["name"]

    # What `kubectl drain` does: the Eviction API, which marks the pod DisruptionTarget first.
    code, body = rest.call("POST", f"/api/v1/namespaces/{ns}/pods/{first}/eviction",
                           {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": first, "namespace": ns}})
    assert code == 201, body

    second = wait_for(lambda: [p["metadata"]["name"] for p in pods_of(rest, ns, "liver-evict")
                               if p["metadata"]["name"] != first and not p["metadata"].get("deletionTimestamp")],
                      60, "a replacement pod", interval=0.2)[0]
    (job,) = jobs(rest, ns)
    assert not job["status"].get("failed"), job["status"]  # not counted against backoffLimit 0
    assert phase(rest, ns, "liver-evict", "Failed") is None

    wait_for(lambda: any(p["metadata"]["name"] == second and p["status"].get("phase") == "Running"
                         for p in pods_of(rest, ns, "liver-evict")), 60, "the replacement running", interval=0.2)
    k8s_cluster.kubectl("annotate", "-n", ns, f"pod/{second}", f"{kc.OUTCOME_ANNOTATION}=succeed", "--overwrite")
    done = wait_for(lambda: phase(rest, ns, "liver-evict", "Succeeded"), 60, "PipelineJob Succeeded", interval=0.2)
    assert done["status"]["jobName"] == "liver-evict"
    assert [j["metadata"]["uid"] for j in jobs(rest, ns)] == [job["metadata"]["uid"]]  # the same, only Job
