"""`gpt2deploy serve PKG --ray`: the serve app as Ray Serve replicas (the `ray` extra)."""

from __future__ import annotations

from ..errors import UsageError
from .app import say


def serve_on_ray(
    package: str,
    *,
    host: str,
    port: int,
    variant: str | None,
    device: str,
    threads: int | None,
    max_batch: int,
    max_queue: int,
    api_key: str | None,
    cors: tuple[str, ...],
    max_body: int,
    grace: float,
    verify: bool,
    prefill_chunk: int,
    replicas: int | None,
    autoscale: str | None,
    threads_per_replica: int,
    address: str | None,
) -> None:
    if threads is not None:
        raise UsageError("with --ray, set ONNX Runtime threads with --threads-per-replica (each replica's CPUs)")
    if replicas is not None and autoscale is not None:
        raise UsageError("use either --replicas N or --autoscale MIN,MAX, not both")
    from ..serving import ray as on_ray  # raises a UsageError naming the extra when Ray is not installed

    opts = on_ray.RayOptions(
        package,
        replicas=1 if replicas is None else replicas,
        autoscale=on_ray.parse_autoscale(autoscale) if autoscale is not None else None,
        threads_per_replica=threads_per_replica,
        variant=variant,
        device=device,
        max_batch=max_batch,
        max_queue=max_queue,
        api_key=api_key,
        cors=cors,
        max_body=max_body,
        grace=grace,
        verify=verify,
        prefill_chunk=prefill_chunk,
    )
    on_ray.run(opts, host=host, port=port, address=address, say=say)
    say("[serve] stopped")
