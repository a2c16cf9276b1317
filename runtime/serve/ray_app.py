"""Scale-out on Ray Serve: the same ASGI app, one model and engine per replica (the ray extra).

Each replica builds its own Server on its node (the model is loaded there, in the replica's process), so the
deployment scales from one machine to a Ray cluster with the same code: `ray start --head` (then `ray start
--address=HEAD:6379` on the other machines), and

    serve run xmtf_onnx.runtime.serve.ray_app:build model_dir=exported/mt0-small num_replicas=2 threads=1

or `xmtf-onnx serve MODEL_DIR --ray --replicas 2`. A replica asks Ray for `threads` CPUs, and takes up to
`max_ongoing_requests` requests at once (above its engine's batch size, so that batches can fill);
`autoscaling` (min/max replicas, target ongoing requests) replaces the fixed replica count.
"""

from __future__ import annotations

from typing import Any

from .app import Limits, Server, build_app


def deployment(model_dir: str, *, variant: str | None = None, threads: int = 1, num_replicas: int = 1,
               limits: Limits | None = None, api_key: str | None = None, name: str | None = None,
               max_ongoing_requests: int | None = None, autoscaling: dict[str, Any] | None = None):
    """A bound Ray Serve application serving MODEL_DIR: pass it to serve.run()."""
    from ray import serve

    limits = limits or Limits()

    def build_asgi_app():  # runs on each replica: its own model, engine and metrics
        return build_app(Server(model_dir, variant, threads, limits, api_key=api_key, name=name))

    options: dict[str, Any] = {
        "name": "xmtf-onnx",
        "ray_actor_options": {"num_cpus": threads},
        "max_ongoing_requests": max_ongoing_requests or 2 * (limits.max_batch_size + limits.max_queue),
        "graceful_shutdown_timeout_s": limits.drain_seconds,
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = num_replicas
    return serve.deployment(serve.ingress(build_asgi_app)(), **options).bind()


def build(args: dict[str, str]):
    """The application builder `serve run xmtf_onnx.runtime.serve.ray_app:build model_dir=... num_replicas=2` uses."""
    known = {"model_dir", "variant", "threads", "num_replicas", "max_batch_size", "max_ongoing_requests", "name",
             "request_timeout", "batching"}
    unknown = sorted(set(args) - known)
    if unknown or "model_dir" not in args:
        raise ValueError(f"give model_dir=FOLDER (and optionally {', '.join(sorted(known - {'model_dir'}))}); "
                         f"unknown: {', '.join(unknown) or 'none'}")
    limits = Limits(max_batch_size=int(args.get("max_batch_size", 16)),
                    request_timeout=float(args.get("request_timeout", 120)), batching=args.get("batching", "exact"))
    return deployment(args["model_dir"], variant=args.get("variant"), threads=int(args.get("threads", 1)),
                      num_replicas=int(args.get("num_replicas", 1)), limits=limits, name=args.get("name"),
                      max_ongoing_requests=int(args["max_ongoing_requests"]) if "max_ongoing_requests" in args
                      else None)
