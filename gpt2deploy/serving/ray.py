"""Scale-out on Ray Serve: the ``serve`` app as replicated deployments (the ``ray`` extra).

Each replica is one ``Deployment`` actor: it loads the package once (a path every node can read, or a ``.zip``
URI that Ray downloads and unpacks on each node), runs ONNX Runtime with as many threads as CPUs it reserved
(``ray_actor_options={"num_cpus": T}``), keeps its own continuous-batching ``Engine`` and answers HTTP with the
very app ``create_app`` builds for ``gpt2deploy serve``. Ray Serve's HTTP proxy routes requests between
replicas; its health checks call ``check_health``, which fails when the engine's decode loop is not running;
every response names its replica in the ``x-gpt2deploy-replica`` header and ``/metrics`` labels every sample
with ``replica="..."``, so load per replica stays visible.

Entry points: ``app_builder(args)`` for ``serve run gpt2deploy.serving.ray:app_builder package=PATH`` and Serve
config files; ``run(...)`` for ``gpt2deploy serve PKG --ray``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import Gpt2DeployError, PackageError, UsageError

try:
    import ray
    from ray import serve
except ImportError:  # pragma: no cover - exercised in a subprocess without ray
    raise UsageError("serving on Ray needs Ray Serve, which is not installed; pip install 'gpt2deploy[ray]'") from None

#: Serve application and deployment names.
APP_NAME = "gpt2deploy"
DEPLOYMENT_NAME = "gpt2deploy"
#: Response header naming the replica that answered.
REPLICA_HEADER = "x-gpt2deploy-replica"
#: URI schemes Ray downloads (a .zip holding one top-level directory: the package).
URI_SCHEMES = ("http", "https", "s3", "gs", "azure", "abfss", "file")
#: A replica's constructor raises with these prefixes (it cannot read the package; another of our errors);
#: ``deploy`` finds them in the error Ray reports and turns them back into one line.
_UNREADABLE = "gpt2deploy-replica-cannot-read-package:"
_REPLICA_ERROR = "gpt2deploy-replica-error:"


class DeploymentFailed(Gpt2DeployError):
    """Ray could not start or run the deployment for a reason other than bad input."""

    exit_code = 1


@dataclass
class RayOptions:
    """What a deployment serves and how it scales. ``autoscale=(min, max)`` replaces ``replicas``."""

    package: str
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    threads_per_replica: int = 1
    variant: str | None = None
    device: str = "cpu"
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    cors: tuple[str, ...] = ()
    max_body: int = 1 << 20
    grace: float = 10.0
    verify: bool = True
    prefill_chunk: int | None = None  # None: the engine's default
    model_id: str | None = None
    health_check_period_s: float = 5.0
    extra_actor_options: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.autoscale is None and self.replicas < 1:
            raise UsageError(f"--replicas must be >= 1 (got {self.replicas})")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if lo < 0 or hi < 1 or lo > hi:
                raise UsageError(f"--autoscale MIN,MAX needs 0 <= MIN <= MAX and MAX >= 1 (got {lo},{hi})")
        if self.threads_per_replica < 1:
            raise UsageError(f"--threads-per-replica must be >= 1 (got {self.threads_per_replica})")
        if self.max_batch < 1:
            raise UsageError(f"--max-batch must be >= 1 (got {self.max_batch})")
        if self.max_queue < 0:
            raise UsageError(f"--max-queue must be >= 0 (got {self.max_queue})")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise UsageError(f"--prefill-chunk must be >= 1 (got {self.prefill_chunk})")


def parse_autoscale(text: str) -> tuple[int, int]:
    """``"MIN,MAX"`` -> (min, max)."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text or "")
    if not m:
        raise UsageError(f"--autoscale takes MIN,MAX replicas, e.g. 1,4 (got {text!r})")
    return int(m.group(1)), int(m.group(2))


def package_source(location: str) -> tuple[str | None, str | None]:
    """``(path, uri)``: a filesystem path (or ``local://`` path) replicas read in place, or a ``.zip`` URI that
    Ray fetches onto each node. A bare path is made absolute here, since replicas run in other directories."""
    text = str(location)
    scheme = urlparse(text).scheme.lower()
    if scheme == "local":
        return unquote(urlparse(text).path), None
    if scheme in URI_SCHEMES:
        if not urlparse(text).path.lower().endswith(".zip"):
            raise UsageError(
                f"package URI {text} is not a .zip; zip the package directory (one top-level folder) "
                "or pass a path every node can read"
            )
        return None, text
    if scheme and len(scheme) > 1:  # not a Windows drive letter
        raise UsageError(
            f"package URI scheme '{scheme}' is not supported; use a path on shared storage or a .zip URI "
            f"({', '.join(URI_SCHEMES)})"
        )
    return str(Path(text).expanduser().absolute()), None


def reserved_threads(default: int = 1) -> int:
    """ONNX Runtime threads for this replica: the CPUs Ray reserved for it (at least 1)."""
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    except Exception:
        return default
    return max(1, int(cpus)) if cpus else default


def _label_metrics(text: str, replica: str) -> str:
    """Add ``replica="..."`` to every sample line of a Prometheus text body."""
    label = f'replica="{replica}"'
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            out.append(line)
            continue
        name, sep, rest = line.partition("{")
        if sep:
            out.append(f"{name}{{{label},{rest}")
        else:
            metric, _, value = line.partition(" ")
            out.append(f"{metric}{{{label}}} {value}")
    return "\n".join(out) + "\n"


class ReplicaTag:
    """ASGI middleware: names the replica in a response header and labels ``/metrics`` samples with it."""

    def __init__(self, app, replica: str):
        self.app = app
        self.replica = replica
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] != "/metrics":

            async def tagged(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), self.header]}
                await send(message)

            return await self.app(scope, receive, tagged)
        start, body = None, []

        async def collect(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        await self.app(scope, receive, collect)
        payload = b"".join(body)
        if start is not None and start["status"] == 200:
            payload = _label_metrics(payload.decode(), self.replica).encode()
        headers = [(k, v) for k, v in (start or {}).get("headers", []) if k.lower() != b"content-length"]
        headers += [(b"content-length", str(len(payload)).encode()), self.header]
        await send({"type": "http.response.start", "status": (start or {}).get("status", 500), "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class Deployment:
    """One replica: the package loaded once, its own engine and decode loop, the ``serve`` app in front."""

    def __init__(self, opts: RayOptions, package_path: str | None = None):
        from .engine import Engine

        self.opts = opts
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.threads = reserved_threads(opts.threads_per_replica)
        path = package_path or os.getcwd()  # a URI package is unpacked into the replica's working directory
        try:
            self.engine = Engine.from_package(
                path, variant=opts.variant, device=opts.device, threads=self.threads, verify=opts.verify,
                max_batch=opts.max_batch, max_queue=opts.max_queue, model_id=opts.model_id,
                **({} if opts.prefill_chunk is None else {"prefill_chunk": opts.prefill_chunk}),
            )  # fmt: skip
        except (PackageError, OSError) as e:
            node = ray.util.get_node_ip_address()
            raise RuntimeError(f"{_UNREADABLE} replica on node {node} cannot read the package at {path}: {e}") from None
        except Gpt2DeployError as e:
            raise RuntimeError(f"{_REPLICA_ERROR} {e}") from None

    def __serve_build_asgi_app__(self):
        from .app import create_app
        from .protocol import Limits

        app = create_app(
            self.engine, api_key=self.opts.api_key, cors=self.opts.cors,
            limits=Limits(max_body_bytes=self.opts.max_body), shutdown_timeout=self.opts.grace,
        )  # fmt: skip
        return ReplicaTag(app, self.replica)

    def check_health(self) -> None:
        """Ray Serve calls this periodically: the replica is healthy when its ``/health`` would answer 200 (the
        model is loaded and the decode loop runs); otherwise Ray replaces it."""
        if not (self.engine.ready.is_set() and self.engine.running):
            raise RuntimeError(f"replica {self.replica}: the model is not ready or its decode loop stopped")

    def replica_info(self) -> dict:
        """Which replica and process answered, its ONNX Runtime threads and engine load (for operators and tests)."""
        m = self.engine.metrics
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "threads": self.threads,
            "variant": self.engine.model.variant,
            "ready": self.engine.ready.is_set() and self.engine.running,
            "queue_depth": m.queue_depth,
            "batch_size": m.batch_size,
        }


def deployment_options(opts: RayOptions, uri: str | None = None) -> dict:
    """``Deployment.options(...)``: replicas or autoscaling, CPUs per replica, in-flight and queue bounds."""
    actor = {"num_cpus": opts.threads_per_replica, **opts.extra_actor_options}
    if uri is not None:
        actor["runtime_env"] = {**actor.get("runtime_env", {}), "working_dir": uri}
    out = {
        "ray_actor_options": actor,
        # A replica holds a full batch and as many waiting; the proxy holds the rest up to max_queue (then 503).
        "max_ongoing_requests": 2 * opts.max_batch,
        "max_queued_requests": max(1, opts.max_queue),
        "health_check_period_s": opts.health_check_period_s,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": opts.grace + 5.0,
    }
    if opts.autoscale is not None:
        lo, hi = opts.autoscale
        out["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": opts.max_batch}
    else:
        out["num_replicas"] = opts.replicas
    return out


def build(opts: RayOptions):
    """The bound Serve application for ``opts`` (what ``serve.run`` takes)."""
    opts.check()
    path, uri = package_source(opts.package)
    if uri is not None and opts.model_id is None:  # not the name of the directory Ray unpacks it into
        opts = dataclasses.replace(opts, model_id=Path(urlparse(uri).path).stem)
    return Deployment.options(**deployment_options(opts, uri)).bind(opts, path)


_INT_ARGS = ("replicas", "threads_per_replica", "max_batch", "max_queue", "max_body", "prefill_chunk")


def app_builder(args: dict):
    """Application builder for ``serve run gpt2deploy.serving.ray:app_builder package=PATH replicas=2`` and Serve
    config files (``import_path: gpt2deploy.serving.ray:app_builder`` with ``args:``). Keys are RayOptions
    fields (``package`` required; ``autoscale`` as ``MIN,MAX``; ``cors`` comma-separated)."""
    return build(options_from_args(args))


def options_from_args(args: dict) -> RayOptions:
    """RayOptions from ``key=value`` strings (``serve run``) or a config file's typed ``args``."""
    args = dict(args or {})
    if "package" not in args and "pkg" in args:
        args["package"] = args.pop("pkg")
    if "package" not in args:
        raise UsageError("app_builder needs package=PATH (a path every node can read, or a .zip URI)")
    known = set(RayOptions.__dataclass_fields__) - {"extra_actor_options"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise UsageError(f"unknown argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    kw = {}
    for key, value in args.items():
        try:
            if key in _INT_ARGS:
                kw[key] = int(value)
            elif key in ("grace", "health_check_period_s"):
                kw[key] = float(value)
            elif key == "verify":
                kw[key] = value if isinstance(value, bool) else str(value).lower() not in ("0", "false", "no")
            elif key == "autoscale":
                kw[key] = parse_autoscale(value) if isinstance(value, str) else tuple(value)
            elif key == "cors":
                kw[key] = tuple(c for c in (value.split(",") if isinstance(value, str) else value) if c)
            else:
                kw[key] = value
        except (TypeError, ValueError):
            raise UsageError(f"argument {key}={value!r} has the wrong type") from None
    return RayOptions(**kw)


build_app = app_builder


# -- running from the CLI -------------------------------------------------------------------------
def connect(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address``, or start a local instance when it is None. Returns True when a
    local instance was started (so ``shutdown`` stops it)."""
    if ray.is_initialized():
        return False
    kw = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **kw)
            return False
        ray.init(num_cpus=num_cpus, **kw)
        return True
    except (ConnectionError, TimeoutError) as e:
        raise UsageError(
            f"no Ray cluster is reachable at {address}: {_first_line(e)}; start one with 'ray start --head' "
            "there, check the address (HOST:PORT or 'auto'), or omit --ray-address to start a local instance"
        ) from None
    except ValueError as e:
        raise UsageError(f"cannot connect to Ray at {address}: {_first_line(e)}; check --ray-address") from None
    except Exception as e:  # Ray failed to start locally (ports, /tmp space, permissions)
        raise DeploymentFailed(
            f"Ray could not start: {_first_line(e)}; see /tmp/ray/session_latest/logs, or start Ray yourself with "
            "'ray start --head' and pass --ray-address"
        ) from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at ``HOST:PORT`` (``ray.init`` would retry for minutes)."""
    if address in ("auto", "local"):
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not port.isdigit() or not host:
        raise UsageError(f"--ray-address {address} is not HOST:PORT, ray://HOST:PORT or 'auto'; check the address")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(
            f"no Ray cluster is reachable at {address} ({e.strerror or type(e).__name__}); start one with "
            "'ray start --head' there, check the address, or omit --ray-address to start a local instance"
        ) from None


def deploy(opts: RayOptions, *, host: str = "127.0.0.1", port: int = 8000, timeout: float = 600.0) -> str:
    """Start Serve's HTTP proxy on ``host:port`` (if Serve is not running yet) and deploy the app; returns the
    base URL. Replicas that cannot read the package raise a UsageError naming the path and the fix."""
    app = build(opts)
    path, _ = package_source(opts.package)
    serve.start(http_options={"host": host, "port": port})
    host, port = _proxy_address(host, port)
    try:
        target = serve.RunTarget(target=app, name=APP_NAME, route_prefix="/")
        serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        _wait_running(timeout)
    except Exception as e:
        with _quiet():
            serve.delete(APP_NAME)
        if isinstance(e, Gpt2DeployError):
            raise
        text = str(e)
        if _UNREADABLE in text:
            detail = text.split(_UNREADABLE, 1)[1].strip().splitlines()[0]
            raise PackageError(
                f"{detail}; put the package ({path or opts.package}) on storage every node mounts at the same path, "
                "or pass a .zip URI the nodes can download"
            ) from None
        if _REPLICA_ERROR in text:
            raise UsageError(text.split(_REPLICA_ERROR, 1)[1].strip().splitlines()[0]) from None
        raise DeploymentFailed(
            f"the Ray deployment failed: {_error_line(text)}; see the replica logs (/tmp/ray/session_latest/logs "
            "on each node)"
        ) from None
    return f"http://{host}:{port}"


def _error_line(text: str) -> str:
    """The most telling line of a traceback Ray reports: its last ``SomethingError: ...`` line."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r"^[\w.]*(Error|Exception)\b", x)]
    return ((errors or lines or ["unknown error"])[-1])[:300]


def _proxy_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's HTTP proxy listens: a Serve instance already running on the cluster keeps its own."""
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        return config.host or host, int(config.port or port)
    except Exception:  # an API that moved: report what was asked for
        return host, port


def _wait_running(timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            messages = [status.message or ""]
            messages += [d.message or "" for d in status.deployments.values()]
            raise RuntimeError(" ".join(messages))
        if time.monotonic() > deadline:
            raise UsageError(
                f"the Ray deployment was not ready after {timeout:.0f} s (status {getattr(status, 'status', None)}); "
                "check that the cluster has the CPUs the replicas reserve (--replicas x --threads-per-replica)"
            )
        time.sleep(0.5)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def undeploy(started_local: bool) -> None:
    """Delete the app (its replicas drain their engines); stop Serve and Ray when this process started them."""
    with _quiet():
        serve.delete(APP_NAME)
    if started_local:
        with _quiet():
            serve.shutdown()
        with _quiet():
            ray.shutdown()


def run(opts: RayOptions, *, host: str, port: int, address: str | None, say=print) -> None:
    """``gpt2deploy serve PKG --ray``: deploy, print the URL, serve until SIGINT/SIGTERM, then undeploy."""
    opts.check()
    path, uri = package_source(opts.package)
    if path is not None and not address and not Path(path).is_dir():
        raise PackageError(f"no package directory at {path}; pass the directory 'gpt2deploy build' wrote")
    started = connect(address)
    try:
        url = deploy(opts, host=host, port=port)
        if url != f"http://{host}:{port}":
            say(f"[serve] Serve was already running on this cluster; its HTTP proxy is {url} (--host/--port unused)")
        n = f"{opts.autoscale[0]}..{opts.autoscale[1]}" if opts.autoscale else str(opts.replicas)
        say(f"[serve] Ray Serve: {n} replica(s) x {opts.threads_per_replica} thread(s) of {opts.package}")
        say(f"[serve] {url}/v1 (auth {'on' if opts.api_key else 'off'}, CORS {'on' if opts.cors else 'off'})")
        stop = threading.Event()
        saved = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not stop.wait(1.0):
                pass
        finally:
            for s, h in saved.items():
                signal.signal(s, h)
    finally:
        undeploy(started)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


__all__ = [
    "APP_NAME",
    "REPLICA_HEADER",
    "Deployment",
    "DeploymentFailed",
    "RayOptions",
    "app_builder",
    "build",
    "build_app",
    "deploy",
    "options_from_args",
    "run",
]
