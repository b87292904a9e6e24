"""The ``vlmkit batch`` command's flags and entry point (imported by ``vlmkit.cli``; loads nothing heavy)."""

from __future__ import annotations

import argparse
import sys

from ..cli_args import non_negative_float, positive_float, positive_int


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """Input, output, concurrency and Ray flags, plus ``vlmkit serve``'s limit, media and batching flags."""
    from ..serve.config import add_serve_arguments

    parser.add_argument("--input", "-i", required=True, help="OpenAI batch file: JSONL of {custom_id, method, url, "
                                                             "body} rows")
    parser.add_argument("--output", "-o", required=True,
                        help="results JSONL (OpenAI batch output lines); an existing one is resumed")
    parser.add_argument("--concurrency", type=positive_int, default=32,
                        help="rows in flight at once, decoded together (per replica with --ray)")
    parser.add_argument("--served-model-name", help="the model id rows may name in body.model (default: the folder "
                                                    "name); rows naming another model get the server's 404")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = parser.add_argument_group("Ray (pip install 'vlmkit[ray]')")
    ray.add_argument("--ray", action="store_true", help="run on a Ray cluster with Ray Data, one model per actor")
    ray.add_argument("--replicas", type=positive_int, default=1, help="model replicas (Ray actors)")
    ray.add_argument("--address", help="Ray cluster address (e.g. auto, or HEAD_IP:6379); default: $RAY_ADDRESS, "
                                       "else a local cluster")
    ray.add_argument("--num-cpus-per-replica", type=positive_float, default=1.0, help="CPUs reserved by each replica")
    ray.add_argument("--num-gpus-per-replica", type=non_negative_float, default=0.0, help="GPUs reserved by each replica")
    add_serve_arguments(parser)


def run_command(args) -> int:
    """Run the job the parsed arguments describe; 0 once every row has a result line."""
    from ..serve.config import config_from_args
    try:
        from ..serve.requests import RequestHandler  # noqa: F401  (the request path needs pydantic)
        from .local import run_batch
    except ImportError as err:
        print(f"vlmkit batch runs rows on the server's request path, which needs {err.name}: "
              f"pip install 'vlmkit[serve]'", file=sys.stderr)
        return 1

    config = config_from_args(args)
    if args.concurrency < 1:
        print("vlmkit batch: --concurrency must be at least 1", file=sys.stderr)
        return 2
    ray_only = [flag for flag, value, default in (("--replicas", args.replicas, 1), ("--address", args.address, None),
                                                   ("--num-cpus-per-replica", args.num_cpus_per_replica, 1.0),
                                                   ("--num-gpus-per-replica", args.num_gpus_per_replica, 0.0))
                if value != default]
    if ray_only and not args.ray:
        print(f"vlmkit batch: {', '.join(ray_only)} only apply with --ray", file=sys.stderr)
        return 2
    try:
        if args.ray:
            from .ray_data import run_batch_on_ray
            report = run_batch_on_ray(config, args.input, args.output, replicas=args.replicas, address=args.address,
                                      num_cpus_per_replica=args.num_cpus_per_replica,
                                      num_gpus_per_replica=args.num_gpus_per_replica, concurrency=args.concurrency,
                                      progress=not args.quiet)
        else:
            report = run_batch(config, args.input, args.output, concurrency=args.concurrency,
                               progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"vlmkit batch: interrupted; the rows written so far are kept in {args.output}: run the same "
              f"command again to finish", file=sys.stderr)
        return 130
    print(f"vlmkit batch: {report.describe(args.output)}", file=sys.stderr)
    return 0 if report.already_done + report.written == report.total else 1
