"""``serve`` subcommand: an artifact over HTTP, on this machine (uvicorn) or as Ray Serve replicas.

    serve --artifact runs/artifacts [--host 127.0.0.1] [--port 8000] [--size 64] [--funnel 16:200,64]
          [--max-batch 64] [--max-wait-ms 2] [--max-sessions 10000] [--session-ttl 3600] [--threads 1]
    serve --artifact DIR --replicas 2 [--address auto]      # Ray Serve: every replica holds the artifact

SIGHUP reloads the artifact folder (sha256-checked; a damaged one is refused and the old one serves
on), as does ``POST /admin/reload`` from a loopback client. SIGTERM and Ctrl-C finish in-flight requests.
"""
import argparse
import logging

from recbole_fmrl.errors import InputError


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: need a positive {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: need a positive {kind.__name__}")
        return value
    return parse


def serve_parser():
    p = argparse.ArgumentParser(prog="recbole-fmrl serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="an artifact folder (size-<m>) or an export root (largest size)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--size", type=positive(int), default=None, help="nested size loaded (default: the artifact's)")
    p.add_argument("--funnel", default=None, help="default funnel of every request, e.g. 16:200,64")
    p.add_argument("--max-batch", type=positive(int), default=64, help="queries per network pass")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a request waits for others to join it")
    p.add_argument("--max-sessions", type=positive(int), default=10_000, help="open streaming sessions at most")
    p.add_argument("--session-ttl", type=positive(float), default=3600.0, help="seconds before an idle session expires")
    p.add_argument("--max-body-bytes", type=positive(int), default=1 << 20, help="request body limit (413 above)")
    p.add_argument("--threads", type=positive(int), default=1, help="torch CPU threads of the model")
    p.add_argument("--remote-admin", action="store_true", help="accept /admin/reload from other hosts")
    p.add_argument("--replicas", type=positive(int), default=None, help="run as a Ray Serve deployment of N replicas")
    p.add_argument("--address", default=None, help="Ray cluster to deploy on (default: a local Ray)")
    return p


def options_from(args):
    from recbole_fmrl.serve.app import ServeOptions

    if args.max_wait_ms < 0:
        raise InputError(f"--max-wait-ms {args.max_wait_ms}: need >= 0")
    return ServeOptions(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_body_bytes=args.max_body_bytes,
                        remote_admin=args.remote_admin)


def serve_main(argv):
    args = serve_parser().parse_args(argv)
    options = options_from(args)
    engine_args = dict(folder=args.artifact, size=args.size, funnel=args.funnel, max_sessions=args.max_sessions,
                       session_ttl=args.session_ttl)
    if args.replicas:
        from recbole_fmrl.serve.ray_serve import run_deployment

        return run_deployment(engine_args, options, args.replicas, args.host, args.port, args.address, args.threads)
    import torch
    import uvicorn

    from recbole_fmrl.serve.app import create_app
    from recbole_fmrl.serve.engine import Engine

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(**engine_args)  # a bad artifact fails here, before the port opens
    options.signals = True
    uvicorn.run(create_app(engine, options), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=30)
    return 0
