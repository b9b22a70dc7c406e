"""kopf handlers, all registered here (on a registry of our own, so importing
this module never touches kopf's default registry).

* every event (create, update, delete, and the initial listing after a
  restart) of a configuration kind marks its namespace dirty: the namespace
  reconcile (``reconciler.py``) re-resolves every object, so a change to one
  object re-evaluates the others (processor created later, conflict winner
  deleted...);
* deletion is held by the finalizer ``dicom.clara.io/finalizer`` until the
  adapter configuration no longer contains the object;
* events on the adapter's ConfigMaps (the rendered one, and the status one the
  adapter publishes its applied version in) re-run the reconcile too;
* events of RegisterResults, register Jobs and ClaraPipelines only add keys to the
  controller's work queue (``controller.py``; the PipelineJobs and pipeline Jobs are
  watched by the controller itself, jobwatch.py, which a startup activity starts):
  the reconciles, retries and the periodic resync happen there (see
  operator/PIPELINES.md, operator/REGISTER.md).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from clara_dicom.models import GROUP, VERSION

from clara_operator.events import EVENT_NAME_PREFIX, EVENT_POSTERS, REPORTING_COMPONENT, post_event
from clara_operator.jobspec import LABEL_COMPONENT
from clara_operator.reconciler import Api, NamespaceReconciler, Options, reconcile_once
from clara_operator.registerjob import COMPONENT_REGISTER
from clara_operator.rendering import CONFIG_KINDS, DOMAIN

registry = kopf.OperatorRegistry()
log = logging.getLogger("clara_operator")

FINALIZER = f"{DOMAIN}/finalizer"
# How long a deletion waits for the configuration to be re-rendered before it
# lets the object go anyway (a stuck finalizer would be worse than a briefly
# stale configuration, which the next reconcile fixes).
DELETE_WAIT_SECONDS = 15.0


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff base, computed for every watch event of every kind, without its deep copy of
    the whole body: kopf copies status and metadata only to drop them (labels and annotations
    aside). At 1,000 PipelineJobs that copy was 11 % of the operator's CPU. Same essence."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        if extra_fields:  # a handler follows some status or metadata field: kopf's own way
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        lean = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        lean["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        return super().build(body=kopf.Body(lean), extra_fields=None)


def configure(settings: kopf.OperatorSettings) -> None:
    """Project-domain persistence, our own Event identity, quiet kopf Events."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=DOMAIN)
    settings.persistence.diffbase_storage = LeanDiffBaseStorage(prefix=DOMAIN, key="last-handled-configuration")
    settings.posting.enabled = True
    settings.posting.level = logging.WARNING  # kopf's own "handler succeeded" chatter stays in the log
    settings.posting.reporting_component = REPORTING_COMPONENT
    settings.posting.event_name_prefix = EVENT_NAME_PREFIX
    # Events are posted by per-object workers, unlimited by default, each on a connection of
    # kopf's unlimited pool: a burst of 1,000 PipelineJobs opened hundreds of TLS connections
    # for Events alone, competing with the Job creates. Events may wait; Jobs should not.
    settings.posting.worker_limit = EVENT_POSTERS
    settings.peering.standalone = True
    # Server-side: kopf filters a handler's labels in the client, so without this its Job watch would
    # receive and process every pipeline Job event too (about six per Job, each with the whole pod
    # template): during a 1,000 burst that was a third of the operator's CPU, for no handler at all.
    settings.watching.label_selectors["batch", "jobs"] = f"{LABEL_COMPONENT}={COMPONENT_REGISTER}"
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300


def reconciler_for(memo: Any, namespace: str, create: bool = True) -> NamespaceReconciler | None:
    reconcilers: dict[str, NamespaceReconciler] = memo.reconcilers
    found = reconcilers.get(namespace)
    if found is None and create:
        api: Api = memo.api
        options: Options = memo.options

        async def run() -> Any:
            return await reconcile_once(api, namespace, options, post_event)

        found = reconcilers[namespace] = NamespaceReconciler(namespace, run, debounce=options.debounce)
    return found


def _register() -> None:
    for cls in CONFIG_KINDS:
        kopf.on.event(GROUP, VERSION, cls.PLURAL, id="mark-dirty", registry=registry)(on_object_event)
        kopf.on.delete(GROUP, VERSION, cls.PLURAL, id="finalize", registry=registry)(on_object_delete)
    kopf.on.event(GROUP, VERSION, "registerresults", id="registerresults", registry=registry)(
        on_registerresults_event)
    kopf.on.event("batch", "v1", "jobs", id="register-job", labels={LABEL_COMPONENT: COMPONENT_REGISTER},
                  registry=registry)(on_register_job_event)
    kopf.on.event(GROUP, VERSION, "clarapipelines", id="pipeline-waiters", registry=registry)(on_pipeline_event)


# The controller's triggers: never fail, never call the API.
def _controller(memo: Any) -> Any:
    """memo.controller (None in tests that run only the namespace reconcile)."""
    return memo.get("controller")


@kopf.on.startup(registry=registry)
async def start_controller(memo: Any, **_: Any) -> None:
    """The controller's workers, watches and Event posters (it posts its Events itself, so it
    needs none of kopf's handler context)."""
    if (controller := _controller(memo)) is not None:
        controller.start()


async def on_registerresults_event(event: dict[str, Any], body: Any, memo: Any, **_: Any) -> None:
    if (controller := _controller(memo)) is not None and event.get("type") != "DELETED":
        controller.registerresults_event(dict(body))


async def on_register_job_event(body: Any, memo: Any, **_: Any) -> None:
    if (controller := _controller(memo)) is not None:
        controller.register_job_event(dict(body))


async def on_pipeline_event(event: dict[str, Any], body: Any, memo: Any, **_: Any) -> None:
    if (controller := _controller(memo)) is not None:
        controller.pipeline_event(dict(body), deleted=event.get("type") == "DELETED")


async def on_object_event(namespace: str, memo: Any, **_: Any) -> None:
    if namespace:
        reconciler_for(memo, namespace).request()  # type: ignore[union-attr]


async def on_object_delete(namespace: str, name: str, body: Any, memo: Any, logger: Any, **_: Any) -> None:
    reconciler = reconciler_for(memo, namespace)
    assert reconciler is not None
    try:
        await reconciler.request_and_wait(timeout=DELETE_WAIT_SECONDS)
    except asyncio.TimeoutError:
        logger.warning("the adapter configuration of %s was not re-rendered within %.0fs; releasing %s anyway",
                       namespace, DELETE_WAIT_SECONDS, name)


def _is_adapter_config_map(name: str, memo: Any, **_: Any) -> bool:
    options: Options = memo.options
    return name in (options.config_map, options.status_config_map)


@kopf.on.event("", "v1", "configmaps", when=_is_adapter_config_map, registry=registry)
async def on_adapter_config_map(namespace: str, memo: Any, **_: Any) -> None:
    # Only namespaces where our objects live; never render into others.
    reconciler = reconciler_for(memo, namespace, create=False)
    if reconciler is not None:
        reconciler.request()


@kopf.on.login(registry=registry)
async def login(**kwargs: Any) -> Any:
    """In-cluster service account or the kubeconfig, as kubernetes_asyncio reads them
    (the same credentials the reconcile's own API client uses)."""
    return await kopf.login_via_async_client(**kwargs)


@kopf.on.probe(id="reconciles", registry=registry)
def probe_reconciles(memo: Any, **_: Any) -> dict[str, int]:
    """Successful reconciles per namespace since start (in the liveness response)."""
    return {ns: r.runs for ns, r in memo.reconcilers.items()}


@kopf.on.probe(id="controller", registry=registry)
def probe_controller(memo: Any, **_: Any) -> dict[str, int]:
    """The PipelineJob controller's queue and counters (in the liveness response)."""
    controller = memo.get("controller")
    return controller.stats() if controller is not None else {}


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: Any, **_: Any) -> None:
    for reconciler in list(memo.reconcilers.values()):
        await reconciler.stop()
    if memo.get("controller") is not None:
        await memo.controller.stop()


_register()
