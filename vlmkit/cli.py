"""The ``vlmkit`` command: chat about images, draw images, convert checkpoints, serve, batch, train.

Every flag value is checked by argparse (``cli_args``) and every path before a model loads."""

import argparse
import inspect
import logging
import math
import os
import re
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .cli_args import (DTYPES, HelpFormatter, device, existing_file, file_stem, guidance_scale, model_source,
                       non_negative_float, non_negative_int, port, positive_int, probability, prompt_text,
                       question_text, secret, seed)
from .errors import InputError, VlmkitError
from .io.folders import writable_folder


def _default_model() -> str:
    model = os.environ.get("VLMKIT_MODEL")
    if model:
        return model
    from .builtin import builtin_model_path
    return builtin_model_path()


def _is_builtin(model: str) -> bool:
    """The built-in model answers questions about a picture of its shapes world and nothing else."""
    from .builtin import BUILTIN_DIR
    return Path(model).resolve() == BUILTIN_DIR.resolve()


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", type=model_source,
                        help="checkpoint folder or cached hub id (default: $VLMKIT_MODEL, else the built-in model)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="weight dtype; auto: the checkpoint's")
    parser.add_argument("--device", type=device, default=None,
                        help="auto, cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="quantize the weights as they load (weight-only; faster decoding, less memory; "
                             "on CPUs use with the default bfloat16)")


def _load_engine(args, model: str):
    from .engine import Engine
    return Engine.load(model, dtype=args.dtype, device=args.device, quantize=args.quantize)


def _takes_video(model: str) -> tuple[str, bool]:
    """(model type, whether its processor takes videos), read from config.json without loading weights."""
    from .auto import family_of
    model_type, _, processor_class = family_of(model)
    return model_type, "videos" in inspect.signature(processor_class.__call__).parameters


def _check_videos(videos: list[str], frames: int) -> None:
    """Each local --video read far enough (header, packets, one frame at most) that a file which is no
    video, or has fewer than --frames frames, is refused before the model loads; URLs are fetched later."""
    from .cli_args import is_url
    from .io.video import check_video_file
    for video in videos:
        if not is_url(video):
            check_video_file(video, frames)


def _check_images(images: list[str]) -> None:
    """Each local --image decoded now, so a file that is no image is refused before the model loads (as
    the chat would read it); URLs are fetched later."""
    from .cli_args import is_url
    from .io.media import load_image
    for image in images:
        if not is_url(image):
            load_image(image)


def cmd_chat(args) -> int:
    from .cli_chat import run_chat, warn_no_image
    if args.prompt is not None and not args.prompt.strip():
        args.prompt = None  # only spaces: no question (as a blank line in -i)
    if not args.prompt and not args.interactive:
        args.parser.error("give a question, or -i for an interactive session")
    model = args.model or _default_model()
    if args.video:
        model_type, takes_video = _takes_video(model)
        if not takes_video:
            args.parser.error(f"argument --video: {model_type} models cannot take video; use a LLaVA-OneVision "
                              f"checkpoint (--model), or give frames as --image")
        _check_videos(args.video, args.frames)
    _check_images(args.image)
    needs_image = _is_builtin(model)
    if needs_image and args.prompt and not args.image:
        warn_no_image("the built-in model")
    engine = _load_engine(args, model)
    return run_chat(engine, args, "the built-in model" if needs_image else "this model", needs_image)


def _output_folder(args) -> Path:
    """``-o``, created now (before the model loads), or a usage error saying why it cannot be."""
    try:
        return writable_folder(Path(args.output).expanduser(), "-o/--output", "the PNGs")
    except InputError as err:
        args.parser.error(f"argument {err}")


def _first_free_index(out: Path, stem: str) -> int:
    """One past the highest ``<stem>-NN.png`` already in ``out``, so earlier images are kept."""
    pattern = re.compile(re.escape(stem) + r"-(\d+)\.png")
    taken = [int(match.group(1)) for file in out.iterdir() if (match := pattern.fullmatch(file.name))]
    return max(taken) + 1 if taken else 0


def _batch_seed(seed_value: int | None, index: int) -> int | None:
    """Batch ``index``'s seed: the given seed for the first, then far-apart seeds, all repeatable."""
    if seed_value is None or index == 0:
        return seed_value
    return (seed_value + index * 0x9E3779B97F4A7C15) % 2**64


def cmd_imagine(args) -> int:
    from tqdm import tqdm

    from .engine import default_max_batch_images
    out = _output_folder(args)
    stem = args.name or "image"
    first = 0 if args.overwrite else _first_free_index(out, stem)
    in_the_way = [path for path in (out / f"{stem}-{first + i:02d}.png" for i in range(args.n)) if path.is_dir()]
    if in_the_way:  # before the model loads, not after the drawing
        raise InputError(f"could not write {in_the_way[0]}: a folder of that name is in the way; move it or pass "
                         f"another -o or --name")
    engine = _load_engine(args, args.model or _default_model())
    if not engine.can_generate_images:
        raise InputError(f"{engine.model_type} checkpoints cannot generate images; vlmkit imagine needs a Janus "
                         f"checkpoint (with its generation weights)")
    batch = args.batch_size or default_max_batch_images(engine.model)
    batches = -(-args.n // batch)
    bar = tqdm(total=1, unit="tok", desc="image tokens", dynamic_ncols=True)
    side = math.isqrt(engine.model.num_image_tokens)  # the picture is drawn a row of tokens at a time
    written = 0
    for batch_index in range(batches):
        count = min(batch, args.n - written)

        def on_step(done, total, offset=batch_index):
            bar.total = total * batches
            bar.update(offset * total + done - bar.n)
            batch_note = f" of batch {offset + 1}/{batches}" if batches > 1 else ""
            bar.set_postfix_str(f"row {done * side // total}/{side}{batch_note}", refresh=False)

        # One batch at a time, so each batch's PNGs are on disk before the next batch starts.
        images = engine.imagine(args.prompt, count, seed=_batch_seed(args.seed, batch_index), guidance_scale=args.cfg,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_batch_images=count, on_step=on_step)
        for image in images:
            path = out / f"{stem}-{first + written:02d}.png"
            _save_png(image, path)
            tqdm.write(str(path), file=sys.stdout)
            written += 1
    bar.close()
    return 0


def _save_png(image, path: Path) -> None:
    """Write one PNG; a write that fails (disk full, a folder that refuses files) leaves no partial file of
    its own and is an error naming the file."""
    if path.is_dir():
        raise InputError(f"could not write {path}: a folder of that name is in the way; move it or pass another -o")
    existed = path.exists()
    try:
        image.save(path)
    except OSError as err:
        if not existed:  # a file of the user's (--overwrite) is never deleted
            path.unlink(missing_ok=True)
        raise InputError(f"could not write {path}: {err.strerror or err}") from None


class _QuietProbes(logging.Filter):
    """Keeps the readiness probe's ``GET /health`` requests out of uvicorn's access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return '"GET /health ' not in record.getMessage()


def _announce_ready(host: str, port_number: int) -> None:
    """Print "ready on http://host:port" to stderr once ``/health`` answers 200 (the model is loaded and
    the socket listens); stop quietly if loading fails."""
    import json
    import urllib.error
    import urllib.request

    probe = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    probe = f"[{probe}]" if ":" in probe else probe
    access_log, quiet = logging.getLogger("uvicorn.access"), _QuietProbes()
    access_log.addFilter(quiet)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://{probe}:{port_number}/health", timeout=2) as response:
                    if response.status == 200:
                        shown = f"[{host}]" if ":" in host else host
                        print(f"vlmkit serve: ready on http://{shown}:{port_number}", file=sys.stderr, flush=True)
                        return
            except urllib.error.HTTPError as err:
                if err.code == 503 and json.loads(err.read() or b"{}").get("status") == "failed":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
    finally:
        access_log.removeFilter(quiet)


def cmd_serve(args) -> int:
    try:
        from .serve.app import run_server
    except ImportError as err:
        print(f"vlmkit serve needs the server extra ({err.name} is missing): pip install 'vlmkit[serve]'",
              file=sys.stderr)
        return 1
    from .serve.config import config_from_args
    from .serve.http import listening_socket
    args.model = args.model or _default_model()
    config = config_from_args(args)
    sock = listening_socket(config.host, config.port)  # a bad --host or --port fails before the model loads
    print(f"vlmkit serve: loading model {args.model} ...", file=sys.stderr, flush=True)
    threading.Thread(target=_announce_ready, args=(args.host, args.port), name="vlmkit-ready", daemon=True).start()
    return run_server(config, sock)


def cmd_batch(args) -> int:
    from .batch.command import run_command
    args.model = args.model or _default_model()
    return run_command(args)


def cmd_convert(args) -> int:
    from .io.convert import convert_to_safetensors
    for path in convert_to_safetensors(args.source, args.destination):
        print(path)
    return 0


def cmd_train(args) -> int:
    import warnings
    from .models.devices import resolve_device
    from .train import Interrupted, Recipe, train
    recipe = Recipe.from_file(args.config) if args.config else None
    if args.time_limit is not None and not args.time_limit > 0:
        raise InputError(f"--time-limit must be a positive number of minutes, got {args.time_limit}")
    try:
        with warnings.catch_warnings():  # the trainer's notices (threads lowered...) as one line each
            warnings.showwarning = lambda message, *_, **__: print(f"vlmkit: warning: {message}", file=sys.stderr)
            out = train(recipe, args.out, resume=args.resume, progress=not args.quiet,
                        device=resolve_device(device=args.device or "auto"),
                        time_limit=None if args.time_limit is None else 60 * args.time_limit)
    except Interrupted as stopped:
        print(f"vlmkit train: {stopped}; continue with --resume", file=sys.stderr)
        return 130
    print(out)
    return 0


def cmd_bench(argv: list[str]) -> int:
    """``vlmkit bench ...``: vlmkit against transformers (``vlmkit.bench.run``, installed with the package)."""
    from .bench.run import main as bench_main
    return bench_main(argv)


def _command(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    parser.set_defaults(parser=parser)
    return parser


class _Version(argparse.Action):
    """``--version``: vlmkit's version, then what a bug report about speed needs (worked out only when asked:
    it imports torch)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        from .nn.cpu_features import cpu_description, kernel_setting
        cpu = cpu_description()
        print(f"vlmkit {__version__}\ntorch {torch.__version__}\nCPU: {cpu['model']}, {cpu['cores']} cores, "
              f"{cpu['class']}; kernels: {cpu['kernels']} (VLMKIT_CPU_KERNELS={kernel_setting()})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description="Run vision-language models: chat about images, "
                                                                "draw images, serve them.")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the version, torch's, the CPU class and the CPU kernels vlmkit runs, and exit")
    commands = parser.add_subparsers(dest="command", required=True)

    chat = _command(commands, "chat", help="ask about images (streams the answer)")
    _add_model_options(chat)
    chat.add_argument("prompt", nargs="?", type=question_text, help="the question")
    chat.add_argument("--image", action="append", default=[], type=existing_file,
                      help="image path or URL (repeatable)")
    chat.add_argument("--video", action="append", default=[], type=existing_file,
                      help="video path (models that take video: LLaVA-OneVision)")
    chat.add_argument("--frames", type=positive_int, default=8, help="frames sampled from each video")
    chat.add_argument("-i", "--interactive", action="store_true",
                      help="keep a multi-turn session (/help lists its commands)")
    chat.add_argument("--max-new-tokens", type=positive_int, default=256, help="longest answer, in tokens")
    chat.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling (with --temperature)")
    chat.add_argument("--top-k", type=non_negative_int, default=0, help="0 = no top-k (with --temperature)")
    chat.add_argument("--seed", type=seed, help="makes sampled answers repeatable")
    chat.set_defaults(run=cmd_chat)

    imagine = _command(commands, "imagine", help="draw images from text (Janus)")
    _add_model_options(imagine)
    imagine.add_argument("prompt", type=prompt_text, help="what to draw")
    imagine.add_argument("-n", type=positive_int, default=1, help="how many images")
    imagine.add_argument("-o", "--output", default=".", help="folder for the PNGs (created if missing)")
    imagine.add_argument("--name", type=file_stem, default="image",
                         help="file name stem: NAME-00.png, NAME-01.png, ... (in -o)")
    imagine.add_argument("--overwrite", action="store_true",
                         help="number from NAME-00.png, replacing PNGs already there (default: number past them)")
    imagine.add_argument("--seed", type=seed, help="makes the images repeatable (with the same -n and --batch-size)")
    imagine.add_argument("--cfg", type=guidance_scale, help="classifier-free guidance weight, 0 to 100 (default: "
                         "the model's generation_config.json, else 5)")
    imagine.add_argument("--temperature", type=non_negative_float,
                         help="default: the model's generation_config.json, else 1")
    imagine.add_argument("--top-k", type=non_negative_int, default=0, help="0 = sample from the full softmax")
    imagine.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling")
    imagine.add_argument("--batch-size", type=positive_int, help="images generated at once (default: what fits); "
                         "each batch is written as soon as it is done")
    imagine.set_defaults(run=cmd_imagine)

    serve = _command(commands, "serve", help="an OpenAI-compatible HTTP server (chat, image generation)")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=port, default=8000, help="port to listen on")
    serve.add_argument("--api-key", type=secret, help="require 'Authorization: Bearer KEY' (default: "
                                                       "$VLMKIT_API_KEY)")
    serve.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    serve.add_argument("--shutdown-timeout", type=non_negative_float, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests before cancelling them")
    from .serve.config import add_http_arguments, add_serve_arguments
    add_serve_arguments(serve)
    add_http_arguments(serve)
    serve.set_defaults(run=cmd_serve)

    batch = _command(commands, "batch", help="answer an OpenAI batch file offline (resumable; --ray for a cluster)")
    _add_model_options(batch)
    from .batch.command import add_batch_arguments
    add_batch_arguments(batch)
    batch.set_defaults(run=cmd_batch)

    commands.add_parser("bench", add_help=False, help="time vlmkit against transformers (vlmkit bench --help)")
    convert = _command(commands, "convert", help="rewrite a .bin checkpoint as safetensors")
    convert.add_argument("source", help="checkpoint folder with .bin weights")
    convert.add_argument("destination", help="folder for the safetensors copy")
    convert.set_defaults(run=cmd_convert)
    train = _command(commands, "train", help="train or fine-tune a Janus model from a recipe (resumable)")
    train.add_argument("--config", type=existing_file,
                       help="recipe JSON (not needed with --resume: the run's own recipe is used)")
    train.add_argument("--out", required=True, help="output folder, new or empty (never overwritten): the checkpoint, "
                                                    "plus training/ state and logs")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--device", type=device, default=None, help="auto, cpu, cuda, cuda:N (default: cuda if "
                                                                    "available)")
    train.add_argument("--time-limit", type=float, metavar="MINUTES",
                       help="checkpoint and stop after training this long (continue later with --resume)")
    train.set_defaults(run=cmd_train)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own options, parsed by the benchmark
        return cmd_bench(argv[1:])
    try:  # torch loads with the first option that needs it, or the command: a Ctrl-C there is an exit too
        args = build_parser().parse_args(argv)
        return args.run(args)
    except VlmkitError as err:
        print(f"vlmkit: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
