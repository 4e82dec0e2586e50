"""What every deployment shares: typed deployment options, error unwrapping, model-store lookup."""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from livelens.errors import unwrap

REPO = Path(__file__).resolve().parents[1]


class Args(BaseModel):
    """Base of the capabilities' args: a partial nested mapping overrides only the keys it names.

    ``moderation.deploy: {max_replicas: 2}`` keeps moderation's own default CPUs and queue limits
    (those of its ``default_factory``), where plain pydantic would rebuild ``DeployOptions`` from
    the class defaults and silently change them.
    """

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _merge_nested_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, f in cls.model_fields.items():
            given = out.get(name)
            if isinstance(given, dict) and f.default_factory is not None:
                default = f.default_factory()
                if isinstance(default, BaseModel):
                    out[name] = {**default.model_dump(exclude_unset=False), **given}
        return out


class DeployOptions(BaseModel):
    """The resources and queue limits of one deployment (every deployment sets all of them).

    Small fractional CPUs because each replica reserves 1 CPU by default, and a 7-deployment graph
    would never schedule on a 2-core machine.
    """

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(0.25, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(64, ge=1)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0)
    health_check_period_s: float = Field(10.0, gt=0)

    def to_options(self, single_replica: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``.

        Args:
            single_replica: Cap autoscaling at one replica, whatever ``max_replicas`` says (a
                deployment that owns a local file: stream state, the label store).
        """
        return {
            "ray_actor_options": {"num_cpus": self.num_cpus, **({"num_gpus": self.num_gpus} if self.num_gpus else {})},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "max_replicas": max(self.max_replicas, self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests,
                # Scale up fast on live traffic bursts, down slowly because model loads are expensive.
                "upscale_delay_s": 10.0,
                "downscale_delay_s": 300.0,
            } | ({"max_replicas": 1} if single_replica else {}),
        }


#: Ray Serve runtime flags, read by every Serve process when it imports Serve; so they go into the
#: environment before ``ray.init`` starts the raylet. ``throughput`` is Ray's own throughput preset
#: (``RAY_SERVE_THROUGHPUT_OPTIMIZED``) less one flag: gRPC between deployments, user code on the
#: replica's main loop, buffered request logs, GC frozen after start-up, and direct ingress (each
#: ingress replica also listens on its own port, 30000+, besides the proxy). The preset also moves
#: handle routers onto the caller's loop, which breaks ``handle.remote().result()`` from a driver or
#: notebook ("No event loop running"), so the router keeps its own loop here.
#: Every mode also has uvicorn's own protocol-error answers (a malformed request line gets a
#: plain-text 400 from the HTTP server itself) written in the error envelope instead.
_ENVELOPE_HOOK = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "livelens.serving.proxy_hooks.install"}
SERVE_MODES: dict[str, dict[str, str]] = {
    "default": {**_ENVELOPE_HOOK},
    "throughput": {
        **_ENVELOPE_HOOK,
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
        "RAY_SERVE_LOG_TO_STDERR": "0",
        "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
        # A direct-ingress replica keeps draining for this long when stopped, so that an external
        # load balancer notices it leaving (Ray's default is 30 s). With none in front, the 30 s made
        # every Ctrl-C of `make run` and every app deletion in the tests wait; with a load balancer,
        # raise it to that balancer's health-check interval.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        # gRPC between replicas refuses messages over 4 MiB by default, so a 4.1 MB image the gateway
        # had accepted (its limit is 20 MB) failed with RESOURCE_EXHAUSTED as a 500 on the way to OCR.
        # The gateway's byte limit is the real bound; this only has to stay above it.
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(128 * 1024 * 1024),
    },
}


def direct_ingress_url(app_name: str, host: str | None = None) -> str | None:
    """``http://host:port/prefix`` of the app's ingress replica when direct ingress is on, else None.

    Args:
        app_name: The Serve application.
        host: The HTTP host Serve was started with; the replica binds there, while the target
            lists the node's address (which a loopback-only server does not answer on).

    Serve has no public call for it in 2.60; the controller's target groups are what its own
    HAProxy integration reads.
    """
    from ray.serve._private.api import _get_global_client

    groups = _get_global_client()._controller.get_target_groups.remote()
    import ray

    for group in ray.get(groups):
        if group.app_name != app_name or getattr(group.protocol, "value", group.protocol) != "HTTP":
            continue
        for target in group.targets:
            if target.name.startswith("SERVE_REPLICA::"):
                # The replica serves the app under its route prefix, as the proxy does.
                prefix = (group.route_prefix or "/").rstrip("/")
                return f"http://{host or target.ip}:{target.port}{prefix}"
    return None


class LocalHandle:
    """A capability's class run inside the calling replica, with a handle's ``h.method.remote(...)`` shape.

    Composition costs a hop per call: on this 2-core machine a Serve handle call carrying a 20 KB
    frame takes about 1.3 ms in the throughput mode, beside a forward pass of about 37 ms. A
    gateway that *colocates* a capability builds its class here instead of calling its
    deployment, so the request stays in one process. The capability then scales with the gateway
    and shares its queue limits; ``GatewayArgs.colocate`` documents the trade.

    ``remote`` schedules coroutine methods as tasks on the running loop (as a handle call starts at
    once) and plain methods in a worker thread, as Serve runs a sync method (``Quality.assess`` takes
    tens of ms and must not stall the gateway's loop). Exceptions come out of the awaited result
    unchanged, as ``unwrap`` gives them for real handles.
    """

    def __init__(self, instance: Any):
        self.instance = instance

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _LocalMethod(getattr(self.instance, name))


class _LocalMethod:
    __slots__ = ("_fn",)

    def __init__(self, fn: Any):
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if inspect.iscoroutinefunction(self._fn):
            return asyncio.ensure_future(self._fn(*args, **kwargs))
        return asyncio.ensure_future(asyncio.to_thread(self._fn, *args, **kwargs))


@dataclass(frozen=True)
class Colocated:
    """A capability to build inside the gateway's replica (a :class:`LocalHandle`) instead of binding it.

    Attributes:
        cls: The capability's class (a deployment's ``func_or_class``).
        args: Its validated args, as the deployment would get them.
    """

    cls: type
    args: Any

    def build(self) -> LocalHandle:
        return LocalHandle(self.cls(self.args))


def replica_died(exc: BaseException) -> bool:
    """Whether a downstream call failed because its replica died (killed, OOM, node lost), not because of the request."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(unwrap(exc), ActorDiedError | ActorUnavailableError | RayActorError)


async def once_more(call: Any) -> Any:
    """Await ``call()``; if its replica died mid-request, call it once more.

    Every downstream call is idempotent (an answer is a function of the image), and Serve sends
    the new call to a live replica, or holds it until the controller has replaced the dead one.
    """
    try:
        return await call()
    except Exception as exc:
        if not replica_died(exc):
            raise
        logging.getLogger("livelens.serve").warning("a downstream replica died mid-request (%s); retrying once",
                                                    type(unwrap(exc)).__name__)
        return await call()
