"""The ``vlmkit`` command: chat about images, draw images, convert checkpoints, serve, batch, train."""

import argparse
import os
import sys
from pathlib import Path

from .errors import InputError, VlmkitError


def _default_model() -> str:
    model = os.environ.get("VLMKIT_MODEL")
    if model:
        return model
    from .builtin import builtin_model_path
    return builtin_model_path()


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", help="checkpoint folder or cached hub id (default: $VLMKIT_MODEL, "
                                              "else the built-in model)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="quantize the weights as they load (weight-only; faster decoding, less memory; "
                             "on CPUs use with the default bfloat16)")


def _load_engine(args):
    from .engine import Engine
    return Engine.load(args.model or _default_model(), dtype=args.dtype, device=args.device, quantize=args.quantize)


def _user_message(text: str, images: list[str], videos: list[str]) -> dict:
    content = [{"type": "image", "path": image} for image in images]
    content += [{"type": "video", "path": video} for video in videos]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def cmd_chat(args) -> int:
    engine = _load_engine(args)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed)
    if args.video:
        options["num_frames"] = args.frames

    def answer(messages):
        started = False

        def show(chunk):  # the reply's first token usually carries the space after "Assistant:"
            nonlocal started
            if not started:
                chunk = chunk.lstrip()
                started = bool(chunk)
            print(chunk, end="", flush=True)

        result = engine.chat(messages, on_text=show, **options)
        print(flush=True)
        return result

    messages = []
    if args.prompt:
        messages.append(_user_message(args.prompt, args.image, args.video))
        result = answer(messages)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
    if not args.interactive:
        if not args.prompt:
            print("vlmkit chat: give a question, or -i for an interactive session", file=sys.stderr)
            return 2
        return 0
    pending_images = [] if args.prompt else list(args.image)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line.startswith("/image "):
            pending_images.append(line[len("/image "):].strip())
            continue
        if not line:
            continue
        messages.append(_user_message(line, pending_images, []))
        pending_images = []
        try:
            result = answer(messages)
        except VlmkitError as err:
            print(f"error: {err}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})


def cmd_imagine(args) -> int:
    from tqdm import tqdm

    from .engine import default_max_batch_images
    engine = _load_engine(args)
    batch = args.batch_size or default_max_batch_images(engine.model)
    bar = tqdm(total=1, unit="tok", desc="image tokens", dynamic_ncols=True)

    def on_step(done, total):
        bar.total = total
        bar.update(done - bar.n)

    images = engine.imagine(args.prompt, args.n, seed=args.seed, guidance_scale=args.cfg,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_batch_images=batch, on_step=on_step)
    bar.close()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or "image"
    for index, image in enumerate(images):
        path = out / f"{stem}-{index:02d}.png"
        image.save(path)
        print(path)
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve.app import run_server
    except ImportError as err:
        print(f"vlmkit serve needs the server extra ({err.name} is missing): pip install 'vlmkit[serve]'",
              file=sys.stderr)
        return 1
    from .serve.config import config_from_args
    args.model = args.model or _default_model()
    return run_server(config_from_args(args))


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
    from .models.base import resolve_device
    from .train import Interrupted, Recipe, train
    recipe = Recipe.from_file(args.config) if args.config else None
    if args.time_limit is not None and not args.time_limit > 0:
        raise InputError(f"--time-limit must be a positive number of minutes, got {args.time_limit}")
    try:
        out = train(recipe, args.out, resume=args.resume, progress=not args.quiet,
                    device=resolve_device(device=args.device or "auto"),
                    time_limit=None if args.time_limit is None else 60 * args.time_limit)
    except Interrupted as stopped:
        print(f"vlmkit train: {stopped}; continue with --resume", file=sys.stderr)
        return 130
    print(out)
    return 0


def cmd_bench(argv: list[str]) -> int:
    """``vlmkit bench ...`` runs ``benchmarks/bench.py`` of the source checkout (vlmkit against transformers)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "bench.py").is_file():
        print("vlmkit bench: needs vlmkit's source checkout (benchmarks/bench.py beside the package)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from benchmarks.bench import main as bench_main
    return bench_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description="Run vision-language models: chat about images, "
                                                                "draw images, serve them.")
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="ask about images (streams the answer)")
    _add_model_options(chat)
    chat.add_argument("prompt", nargs="?", help="the question")
    chat.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    chat.add_argument("--video", action="append", default=[], help="video path (models that take video)")
    chat.add_argument("--frames", type=int, default=8, help="frames sampled from each video")
    chat.add_argument("-i", "--interactive", action="store_true", help="keep a multi-turn session "
                                                                      "(/image PATH adds an image, /exit quits)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--seed", type=int)
    chat.set_defaults(run=cmd_chat)

    imagine = commands.add_parser("imagine", help="draw images from text (Janus)")
    _add_model_options(imagine)
    imagine.add_argument("prompt")
    imagine.add_argument("-n", type=int, default=1, help="how many images")
    imagine.add_argument("-o", "--output", default=".", help="folder for the PNGs")
    imagine.add_argument("--name", help="file name stem (default: image)")
    imagine.add_argument("--seed", type=int)
    imagine.add_argument("--cfg", type=float, help="classifier-free guidance weight (default: the model's "
                         "generation_config.json, else 5)")
    imagine.add_argument("--temperature", type=float, help="default: the model's generation_config.json, else 1")
    imagine.add_argument("--top-k", type=int, default=0, help="0 = sample from the full softmax")
    imagine.add_argument("--top-p", type=float, default=1.0)
    imagine.add_argument("--batch-size", type=int, help="images generated at once (default: what fits)")
    imagine.set_defaults(run=cmd_imagine)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, image generation)")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $VLMKIT_API_KEY)")
    serve.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds SIGTERM waits for in-flight requests before cancelling them")
    from .serve.config import add_serve_arguments
    add_serve_arguments(serve)
    serve.set_defaults(run=cmd_serve)

    batch = commands.add_parser("batch", help="answer an OpenAI batch file offline (resumable; --ray for a cluster)")
    _add_model_options(batch)
    from .batch.command import add_batch_arguments
    add_batch_arguments(batch)
    batch.set_defaults(run=cmd_batch)

    commands.add_parser("bench", add_help=False, help="time vlmkit against transformers (vlmkit bench --help)")
    convert = commands.add_parser("convert", help="rewrite a .bin checkpoint as safetensors")
    convert.add_argument("source")
    convert.add_argument("destination")
    convert.set_defaults(run=cmd_convert)
    train = commands.add_parser("train", help="train or fine-tune a Janus model from a recipe (resumable)")
    train.add_argument("--config", help="recipe JSON (not needed with --resume: the run's own recipe is used)")
    train.add_argument("--out", required=True, help="output folder: the checkpoint, plus training/ state and logs")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    train.add_argument("--time-limit", type=float, metavar="MINUTES",
                       help="checkpoint and stop after training this long (continue later with --resume)")
    train.set_defaults(run=cmd_train)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own options, parsed by the benchmark
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except VlmkitError as err:
        print(f"vlmkit: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
