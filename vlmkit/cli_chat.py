"""``vlmkit chat``: one question, or an interactive session (``-i``) with slash commands and a history
that drops its oldest turns when it would overflow the model's context."""

import argparse
import sys

from .cli_args import existing_file, text_problem
from .errors import VlmkitError

BANNER = ("vlmkit chat: type a question and press Enter. /image PATH attaches an image to the next question, "
          "/reset starts a new conversation, /help lists the commands, /exit or Ctrl-D quits.")
COMMANDS = """commands (never sent to the model):
  /image PATH   attach an image (path or URL) to the next question
  /reset        forget the conversation so far
  /help         this list
  /exit, /quit  leave (so does Ctrl-D)"""


def user_message(text: str, images: list[str], videos: list[str]) -> dict:
    """A user turn in content-block form: its images, then its videos, then the text."""
    content = [{"type": "image", "path": image} for image in images]
    content += [{"type": "video", "path": video} for video in videos]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def has_image(messages: list[dict]) -> bool:
    """Whether any turn of the conversation carries an image."""
    return any(part["type"] == "image" for message in messages for part in message["content"])


def fit_history(messages: list[dict], prompt_tokens, room: int) -> int:
    """Drop the oldest turns (a question and its answer) until ``prompt_tokens(messages)`` fits in ``room``;
    the newest question always stays. Returns how many turns were dropped."""
    dropped = 0
    while len(messages) > 1 and prompt_tokens(messages) > room:
        del messages[:2]
        dropped += 1
    return dropped


class ChatSession:
    """A loaded engine, the sampling options and how answers are shown; ``answer`` streams one reply."""

    def __init__(self, engine, options: dict, warn_without_image: bool):
        self.engine = engine
        self.options = options
        self.warn_without_image = warn_without_image

    def answer(self, messages: list[dict]):
        """Stream the answer to the last user turn to stdout; returns the engine's ``ChatResult``."""
        started = False

        def show(chunk):  # the reply's first token usually carries the space after "Assistant:"
            nonlocal started
            if not started:
                chunk = chunk.lstrip()
                started = bool(chunk)
            print(chunk, end="", flush=True)

        result = self.engine.chat(messages, on_text=show, **self.options)
        print(flush=True)
        return result

    def prompt_tokens(self, messages: list[dict]) -> int:
        """How many tokens the conversation takes as a prompt (images included)."""
        return int(self.engine.prepare_chat(messages)["input_ids"].shape[1])

    def room(self) -> int:
        """Prompt tokens that leave the answer its ``max_new_tokens`` within the model's context."""
        return self.engine.model.max_context - self.options["max_new_tokens"]


def warn_no_image(model_name: str) -> None:
    """Tell the user, on stderr, that this model's answers need an image to mean anything."""
    print(f"vlmkit chat: warning: {model_name} answers questions about an image; without --image (or /image "
          f"PATH) its answer means little", file=sys.stderr)


def run_interactive(session: ChatSession, messages: list[dict], pending_images: list[str], pending_videos: list[str],
                    model_name: str) -> int:
    """Read questions and slash commands from stdin until /exit or end of input; the pending images and
    videos (given on the command line without a question) go with the first question."""
    print(BANNER, file=sys.stderr, flush=True)
    warned = bool(messages)  # a question given on the command line has had its warning already
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        except UnicodeDecodeError as err:  # a terminal whose encoding is stricter than what was typed
            print(f"error: the line is not valid {err.encoding} ({err.reason}); check the terminal's encoding "
                  f"(e.g. LANG=C.UTF-8) and type it again", file=sys.stderr)
            continue
        if not line:
            continue
        problem = text_problem(line)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            argument = argument.strip()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/help":
                print(COMMANDS, file=sys.stderr)
            elif command == "/reset":
                messages.clear()
                pending_images, pending_videos = [], []
                warned = False
                print("(conversation cleared)", file=sys.stderr)
            elif command == "/image":
                if not argument:
                    print("error: give the image: /image PATH", file=sys.stderr)
                    continue
                try:
                    pending_images.append(existing_file(argument))
                except argparse.ArgumentTypeError as err:
                    print(f"error: /image: {err}", file=sys.stderr)
                    continue
                print(f"(attached {argument} to the next question)", file=sys.stderr)
            else:
                print(f"error: unknown command {command}; /help lists the commands", file=sys.stderr)
            continue
        # the question goes to a copy of the conversation: one that is refused (too long, a bad picture)
        # leaves the conversation as it was, its oldest turns included
        conversation = messages + [user_message(line, pending_images, pending_videos)]
        # attached to this question only, answered or not (a bad picture is not re-sent)
        pending_images, pending_videos = [], []
        if session.warn_without_image and not warned and not has_image(conversation):
            warn_no_image(model_name)
            warned = True
        try:
            room = session.room()
            dropped = fit_history(conversation, session.prompt_tokens, room)
            # a question too long on its own is refused below; the turns it pushed out are kept
            if dropped and (len(conversation) > 1 or session.prompt_tokens(conversation) <= room):
                print(f"(dropped the oldest {dropped} turn(s) to fit the model's context of "
                      f"{session.engine.model.max_context} tokens)", file=sys.stderr)
            result = session.answer(conversation)
        except VlmkitError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session (Ctrl-C at the prompt ends it)
            print("\n(answer stopped; the question is not kept)", file=sys.stderr)
            continue
        messages[:] = conversation + [{"role": "assistant", "content": [{"type": "text", "text": result.text}]}]


def run_chat(engine, args, model_name: str, needs_image: bool) -> int:
    """Answer ``args.prompt`` (if given), then continue interactively with ``-i``."""
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed)
    if args.video:
        options["num_frames"] = args.frames
    session = ChatSession(engine, options, needs_image)
    messages = []
    if args.prompt:
        messages.append(user_message(args.prompt, args.image, args.video))
        result = session.answer(messages)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
    if not args.interactive:
        return 0
    pending = ([], []) if args.prompt else (list(args.image), list(args.video))
    return run_interactive(session, messages, *pending, model_name)
