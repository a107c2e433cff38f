"""`serving serve` runs the gRPC server for a bundle; `serving predict` asks a running one;
`serving health` asks its standard health service, as a container's HEALTHCHECK does."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from serving.signals import Signals

# grpc, pydantic, numpy and the rest are imported where they are used, after main() has installed
# `serve`'s signal handlers: until then a SIGHUP would kill the process (serving/signals.py).


def _serve_parser(sub) -> None:
    from serving.config import ServerConfig, describe

    p = sub.add_parser(
        "serve",
        help="serve a bundle or a model repository over gRPC",
        description="Serve an export bundle over gRPC, with the standard health service, server reflection and "
        "Prometheus metrics. With --model-repository, new versions are loaded live (every --poll-s seconds, and "
        "at once on SIGHUP). Every flag can also be set as SERVING_<NAME> in the environment; flags win. "
        "Requests larger than --max-message-bytes are refused by gRPC with RESOURCE_EXHAUSTED.",
    )
    for name in ServerConfig.model_fields:
        p.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=None, metavar=name.upper(), help=describe(name)
        )


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify image files with a running server")
    p.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, WebP, BMP, ...)")
    p.add_argument("--target", default="localhost:50051", help="server address host:port (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default: %(default)s)")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run every TTA view of the bundle (--tta) or only the plain centre view (--no-tta) "
        "(default: as the bundle chose at export, from its validation scores)",
    )
    p.add_argument(
        "--model",
        default="",
        help="model to ask, for a server with a model repository (default: its only model)",
    )
    p.add_argument(
        "--version",
        type=int,
        default=0,
        help="model version to ask; 0 = the one the server's version policy serves (default: %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (default: %(default)s)")
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="PEM file of the CA that signed the server's certificate, for a TLS server (default: plaintext)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        help="PEM certificate chain to present to a server that requires client certificates (mutual TLS); "
        "with --tls-key and --tls-ca (default: none)",
    )
    p.add_argument("--tls-key", type=Path, default=None, help="PEM private key for --tls-cert (default: none)")


def _health_parser(sub) -> None:
    p = sub.add_parser(
        "health",
        help="ask a running server's grpc.health.v1 service; exit 0 when SERVING, 1 otherwise",
        description="Exit 0 when the server reports SERVING, 1 otherwise (loading, draining, unreachable): the "
        "contract of a Docker HEALTHCHECK. The default target is this machine's SERVING_PORT, so inside the "
        "server's container the command needs no arguments.",
    )
    port = os.environ.get("SERVING_PORT", "50051")
    p.add_argument("--target", default=f"127.0.0.1:{port}", help="server address host:port (default: %(default)s)")
    p.add_argument("--service", default="", help="health service name; empty for the whole server (default: '')")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: %(default)s)")
    p.add_argument("--tls-ca", type=Path, default=None, help="PEM file of the server's CA, for a TLS server")


def run_health(args) -> int:
    import grpc

    from serving.client import Client

    with Client(args.target, timeout=args.timeout, tls_ca=args.tls_ca) as client:
        try:
            status = client.health(args.service)
        except grpc.RpcError as e:
            print(f"{args.target}: {_said(e)}", file=sys.stderr)
            return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1


def run_predict(args) -> int:
    import grpc

    from serving.client import Client

    try:
        client = Client(
            args.target, timeout=args.timeout, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key
        )
    except (ValueError, OSError) as e:  # TLS flags that do not go together, or a PEM file that cannot be read
        print(f"serving: {e}", file=sys.stderr)
        return 2
    status = 0
    with client:
        for path in args.images:
            try:
                reply = client.predict(
                    path.read_bytes(), top_k=args.top_k, tta=args.tta, model=args.model, version=args.version
                )
            except OSError as e:
                print(f"{path}: cannot read: {e.strerror or e}", file=sys.stderr)
                status = 1
                continue
            except grpc.RpcError as e:
                print(f"{path}: {_said(e)}", file=sys.stderr)
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return 2
                status = 1
                continue
            ranked = ", ".join(f"{p.label} {p.probability:.3f}" for p in reply.predictions)
            print(f"{path}: {ranked}  [{len(reply.tta_views)} views]")
    return status


def _said(error) -> str:
    """A failed call in one line for people: gRPC's own words for a server that is not there name the
    transport's internals ('failed to connect to all addresses; last error: UNKNOWN: ipv4:...')."""
    import grpc

    details = error.details() or ""
    if error.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
        return (
            "UNAVAILABLE: no server answers there (connection refused or unreachable); start one with "
            "`serving serve --bundle BUNDLE`, or pass its address with --target"
        )
    return f"{error.code().name}: {details}"


def main(argv: list[str] | None = None) -> int:
    # Only when this process is `serving serve` itself: a caller that passes argv (a test) keeps its
    # own handlers, and Ctrl-C ends `predict` and `health` as usual. The only option before the
    # command is -h, so the first argument names it.
    signals = Signals().install() if argv is None and sys.argv[1:2] == ["serve"] else None
    parser = argparse.ArgumentParser(prog="serving", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _predict_parser(sub)
    _health_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "predict":
        return run_predict(args)
    if args.command == "health":
        return run_health(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from serving.bundle.manifest import BundleError
    from serving.config import ConfigError, ServerConfig, load_config
    from serving.server import serve

    flags = {k: v for k, v in vars(args).items() if k in ServerConfig.model_fields}
    try:
        return serve(load_config(flags), signals)
    except (ConfigError, BundleError, OSError) as e:
        print(f"serving: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
