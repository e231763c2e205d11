"""The same HTTP app as a Ray Serve deployment: N replicas, each holding the artifact, on any Ray cluster.

Each replica builds its own ``Engine`` from the artifact folder (every node must read that path) and
batches its own requests; Ray's proxy spreads requests over replicas. Sessions live in the replica
that opened them and Ray does not route a session's requests to one replica, so with more than one
replica use ``POST /recommend`` (stateless) or keep a client on one replica; a lost replica loses
its sessions. ``/admin/reload`` reloads one replica: roll a new artifact out with ``serve.run`` again
(Ray replaces replicas one by one).
"""
import time


def app_builder(engine_args, options, threads):
    """A function Ray evaluates on each replica to build its ASGI app."""

    def build():
        import torch

        from recbole_fmrl.serve.app import create_app
        from recbole_fmrl.serve.engine import Engine

        torch.set_num_threads(threads)
        return create_app(Engine(**engine_args), options)

    return build


def application(engine_args, options, replicas, threads=1, num_cpus=1.0):
    """A Ray Serve application (``serve.run`` it) of ``replicas`` copies of the app."""
    from ray import serve

    ingress = serve.ingress(app_builder(engine_args, options, threads))()
    deployment = serve.deployment(name="recbole_fmrl", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": num_cpus})(ingress)
    return deployment.bind()


def run_deployment(engine_args, options, replicas, host, port, address=None, threads=1):
    import ray
    from ray import serve

    from recbole_fmrl.serve.engine import Engine
    from recbole_fmrl.tune.search import check_ray_version

    check_ray_version()
    Engine(**{**engine_args, "max_sessions": 1})  # a bad artifact fails here, in one line, not in every replica
    ray.init(address=address or "local")
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(engine_args, options, replicas, threads), name="recbole_fmrl", route_prefix="/")
    print(f"serving {engine_args['folder']} on http://{host}:{port} with {replicas} replica(s); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
