"""The cloud venue on a Ray cluster: published models run in a Ray Serve deployment.

With the ``ray`` extra and the fleet's ``cloud_ray`` setting (``edgeos fleet serve
--cloud-ray ADDRESS``), the fleet process connects to the cluster as a Ray driver and
deploys one Serve application, ``edgeos-cloud-venue``, whose replicas run published
models in ONNX Runtime. The fleet stays the front door (device certificates, audit, V2
decoding and encoding); it calls the replicas through a ``DeploymentHandle``.

A model travels by content address: the fleet reads the artifact's ONNX file once and
puts it in Ray's object store, and every call names the model and passes the reference.
A replica that has not loaded the model yet fetches the bytes from the object store,
which works on any machine of the cluster, and keeps the session by model and version.

The cluster's machines need ``edgeos`` installed (with the ``ray`` extra, the version the
fleet runs): a replica imports this module. The deployment stays on the cluster when the
fleet stops, so several fleet replicas can share it; each fleet process deploys it again
when it starts, which restarts the replicas with its settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from edgeos.errors import ConfigError, EdgeOSError, UnavailableError
from edgeos.fleet.cloud_backend import (
    FetchModel,
    LoadedModel,
    PublishedModel,
    Ran,
    Signature,
    load_model,
    run_model,
)

if TYPE_CHECKING:
    import numpy as np

#: The Serve application (and its one deployment) on the cluster.
APP = "edgeos-cloud-venue"
DEPLOYMENT = "models"
#: How long the cluster's address may take to accept a connection at start-up.
CONNECT_TIMEOUT_S = 5.0
#: How long one call may wait for the cluster before the venue answers 503.
CALL_TIMEOUT_S = 60.0
#: How long a readiness probe waits for a replica to answer.
READY_TIMEOUT_S = 5.0
#: What to install when ``ray`` is missing.
INSTALL = "pip install 'edgeos[ray]'"


class CloudReplica:
    """One replica of the deployment: sessions of the models it was asked to run.

    Methods answer an expected refusal (a model that does not load, inputs ONNX Runtime
    refuses) with the EdgeOSError itself rather than raising it, so the fleet re-raises it
    unchanged instead of unwrapping Ray's task error around it.
    """

    def __init__(self) -> None:
        from ray import serve

        self.replica_id = str(serve.get_replica_context().replica_id.unique_id)
        self._loaded: dict[PublishedModel, LoadedModel] = {}
        self._lock = asyncio.Lock()

    async def _get(self, model: PublishedModel, onnx: list[Any]) -> LoadedModel:
        loaded = self._loaded.get(model)
        if loaded is None:
            async with self._lock:  # one load at a time: a model loads once per replica
                loaded = self._loaded.get(model)
                if loaded is None:
                    data: bytes = await onnx[0]
                    loaded = await asyncio.to_thread(load_model, model, data)
                    # Only the latest version is asked for: calls still running on an
                    # older one hold their own reference to it.
                    _forget_older(self._loaded, model)
                    self._loaded[model] = loaded
        return loaded

    async def ping(self) -> str:
        """This replica's id: it is up and its event loop answers."""
        return self.replica_id

    async def signature(self, model: PublishedModel, onnx: list[Any]) -> Signature | EdgeOSError:
        """The model's signature, loading it from the object store reference ``onnx[0]``."""
        try:
            return (await self._get(model, onnx)).signature
        except EdgeOSError as exc:
            return exc

    async def run(
        self, model: PublishedModel, onnx: list[Any], feeds: Mapping[str, np.ndarray[Any, Any]]
    ) -> Ran | EdgeOSError:
        """The model's outputs on ``feeds``, run on a worker thread of this replica."""
        try:
            loaded = await self._get(model, onnx)
            return Ran(await asyncio.to_thread(run_model, loaded, feeds), self.replica_id)
        except EdgeOSError as exc:
            return exc


def _forget_older(cache: dict[PublishedModel, Any], model: PublishedModel) -> None:
    """Drop the entries of ``model``'s other versions from ``cache``."""
    for known in [known for known in cache if known.name == model.name and known != model]:
        del cache[known]


def _import_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401  (Serve comes with ray[serve] only)
    except ImportError as exc:
        raise ConfigError(f"the cloud venue on Ray needs the ray extra: {INSTALL}") from exc
    return ray


def _probe(address: str) -> None:
    """UnavailableError unless the cluster's address accepts a TCP connection: Ray itself
    retries an unreachable address for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"Ray address {address!r}: give HOST:PORT, ray://HOST:PORT, auto or local"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UnavailableError(
            f"the Ray cluster at {address} does not answer ({exc}): start it "
            "(`ray start --head`) or correct the cloud Ray address"
        ) from exc


def _connect(ray: Any, address: str) -> None:
    if ray.is_initialized():  # a process is the driver of one cluster: keep it
        return
    if address not in ("local", "auto"):
        _probe(address)
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        raise UnavailableError(
            f"cannot connect to the Ray cluster at {address}: {exc} (a cluster with Ray's "
            "token authentication needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in the "
            "fleet's environment)"
        ) from exc


_lock = threading.Lock()
#: This process's deployment: (address, replicas, handle).
_deployed: tuple[str, tuple[int, int], Any] | None = None


def deploy(address: str, replicas: tuple[int, int]) -> Any:
    """Connect this process to the Ray cluster at ``address`` and deploy the cloud venue
    with ``replicas`` (min, max); the ``DeploymentHandle``. Done once per process (a
    process is the driver of one cluster): later calls with the same settings get the
    same handle, other settings a ConfigError.

    ConfigError when the ``ray`` extra is missing, UnavailableError when the cluster does
    not answer.
    """
    global _deployed
    with _lock:
        if _deployed is not None:
            if _deployed[:2] != (address, replicas):
                raise ConfigError(
                    f"this process runs the cloud venue on the Ray cluster at {_deployed[0]} "
                    f"with {_deployed[1]} replicas already"
                )
            return _deployed[2]
        ray = _import_ray()
        from ray import serve

        _connect(ray, address)
        low, high = replicas
        # One CPU per replica, as each session runs one intra-op thread per call.
        options: dict[str, Any] = {"name": DEPLOYMENT, "ray_actor_options": {"num_cpus": 1}}
        if low == high:
            options["num_replicas"] = low
        else:
            options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high}
        try:
            # The fleet is the front door: Serve's own HTTP proxies stay off.
            serve.start(proxy_location="Disabled")
            app = serve.deployment(CloudReplica).options(**options).bind()
            handle = serve.run(app, name=APP, route_prefix=None)
        except Exception as exc:  # Serve raises RayServeException, RuntimeError...
            raise UnavailableError(
                f"could not deploy the cloud venue on the Ray cluster at {address}: {exc}"
            ) from exc
        _deployed = (address, replicas, handle)
        return handle


def disconnect() -> None:
    """Forget the deployment's handle and disconnect this process from Ray (the deployment
    itself stays on the cluster; a cluster this process started as ``local`` stops)."""
    global _deployed
    with _lock:
        _deployed = None
        with contextlib.suppress(ImportError):
            import ray

            ray.shutdown()


class RayBackend:
    """Runs published models on the cloud venue's Ray Serve deployment (``handle``, from
    ``deploy``), fetching a model's ONNX file with ``fetch`` the first time it is asked for."""

    def __init__(self, handle: Any, fetch: FetchModel) -> None:
        self._handle = handle
        self._fetch = fetch
        #: Each model's ONNX file in the object store, as a one-item list: Ray resolves
        #: an ObjectRef passed as an argument itself, but leaves one inside a list alone,
        #: so only a replica that has not loaded the model fetches the bytes.
        self._files: dict[PublishedModel, list[Any]] = {}
        self._signatures: dict[PublishedModel, Signature] = {}

    async def signature(self, model: PublishedModel) -> Signature:
        """The model's signature, asked of a replica on the first call and then kept."""
        signature = self._signatures.get(model)
        if signature is None:
            signature = self._signatures[model] = await self._call("signature", model)
        return signature

    async def run(self, model: PublishedModel, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Ran:
        """Run the model on a replica; the answer names it."""
        ran: Ran = await self._call("run", model, feeds)
        return ran

    async def ready(self) -> None:
        """A replica answers within :data:`READY_TIMEOUT_S`; UnavailableError otherwise."""
        try:
            await asyncio.wait_for(self._handle.ping.remote(), READY_TIMEOUT_S)
        except Exception as exc:  # Ray and Serve raise many types, and a dead cluster none
            raise UnavailableError(
                f"the cloud venue's Ray cluster does not answer: {type(exc).__name__}: {exc}"
            ) from exc

    async def _file(self, model: PublishedModel) -> list[Any]:
        ref = self._files.get(model)
        if ref is None:
            import ray

            data = await run_in_threadpool(self._fetch, model)
            ref = [await run_in_threadpool(ray.put, data)]
            _forget_older(self._files, model)  # frees the object store of older versions
            _forget_older(self._signatures, model)
            ref = self._files.setdefault(model, ref)
        return ref

    async def _call(self, method: str, model: PublishedModel, *args: Any) -> Any:
        onnx = await self._file(model)
        try:
            response = getattr(self._handle, method).remote(model, onnx, *args)
            result = await asyncio.wait_for(response, CALL_TIMEOUT_S)
        except Exception as exc:  # Ray and Serve raise many types: the cluster, a replica
            raise UnavailableError(  # or the call failed; the node may try again later
                f"the cloud venue's Ray cluster did not run model {model.name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(result, EdgeOSError):
            raise result
        return result
