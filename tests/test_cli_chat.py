"""vlmkit chat on the built-in model: the interactive session's banner and slash commands, a history that
drops its oldest turns to fit the context, and the warning for a question without an image."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmkit.cli_chat import fit_history, user_message

PICTURE = str(Path(__file__).resolve().parent.parent / "examples" / "a_blue_triangle_on_the_right.png")


def run_chat(*args, stdin=None):
    env = {key: value for key, value in os.environ.items() if key != "VLMKIT_MODEL"}  # the built-in model
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "vlmkit.cli", "chat", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, env=env)


class RecordingSession:
    """What run_interactive uses of ChatSession, recording each conversation it is asked to answer (the first
    answer interrupted by Ctrl-C with ``interrupt_first``)."""

    warn_without_image = False

    def __init__(self, interrupt_first: bool = False):
        self.asked, self.interrupt_first = [], interrupt_first

    def answer(self, messages):
        self.asked.append([dict(m) for m in messages])
        if self.interrupt_first and len(self.asked) == 1:
            raise KeyboardInterrupt
        return type("Result", (), {"text": "ok"})()

    def prompt_tokens(self, messages):
        return 1

    def room(self):
        return 100


def answers(stdout: str) -> list[str]:
    """The answers of an interactive session (what follows each ">>> " prompt, when anything does)."""
    return [line for line in stdout.replace(">>> ", "\n").splitlines() if line.strip()]


def test_fit_history_drops_the_oldest_turns_first_and_keeps_the_new_question():
    messages = []
    for turn in range(4):
        messages += [user_message(f"question {turn}", [], []),
                     {"role": "assistant", "content": [{"type": "text", "text": f"answer {turn}"}]}]
    messages.append(user_message("question 4", [], []))
    assert fit_history(messages, len, room=5) == 2  # one "token" per message
    assert [m["content"][-1]["text"] for m in messages] == ["question 2", "answer 2", "question 3", "answer 3",
                                                          "question 4"]
    assert fit_history(messages, len, room=0) == 2 and len(messages) == 1  # the new question always stays


def test_interactive_session_has_a_banner_and_commands_never_reach_the_model():
    result = run_chat("-i", stdin="/help\n/bogus\n/image /no/such/picture.png\n/image\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "/image PATH" in result.stderr.splitlines()[0]  # the banner says how to use it
    assert "/reset" in result.stderr and "/exit" in result.stderr  # /help
    assert "error: unknown command /bogus; /help lists the commands" in result.stderr
    assert "error: /image: no such file: /no/such/picture.png" in result.stderr
    assert "error: give the image: /image PATH" in result.stderr
    assert answers(result.stdout) == []  # nothing was sent to the model


def test_reset_forgets_the_conversation_and_its_images():
    result = run_chat("-i", "--max-new-tokens", "12",
                      stdin=f"/image {PICTURE}\nWhat is in this image?\n/reset\nWhat colour is the shape?\n")
    assert result.returncode == 0, result.stderr
    assert answers(result.stdout)[0] == "a blue triangle on the right"
    assert "(conversation cleared)" in result.stderr
    assert "without --image" in result.stderr  # after /reset the question has no image


def test_a_long_session_drops_its_oldest_turns_instead_of_overflowing_the_context():
    # 900 of the built-in model's 1024 positions go to the answer; one question with its image takes ~81,
    # so each new question pushes the previous turn out.
    questions = "".join(f"/image {PICTURE}\n{q}\n" for q in ("What is in this image?", "What colour is the shape?",
                                                             "Where is the shape?"))
    result = run_chat("-i", "--max-new-tokens", "900", stdin=questions)
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr
    assert result.stderr.count("dropped the oldest 1 turn(s) to fit the model's context of 1024 tokens") == 2
    replies = answers(result.stdout)
    assert len(replies) == 3 and replies[:2] == ["a blue triangle on the right", "blue"]


@pytest.mark.parametrize("with_image", [False, True])
def test_a_question_without_an_image_to_the_built_in_model_is_warned(with_image):
    images = ["--image", PICTURE] if with_image else []
    result = run_chat(*images, "What colour is the shape?", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    warned = "warning: the built-in model answers questions about an image" in result.stderr
    assert warned != with_image


def test_pictures_and_videos_given_without_a_question_go_with_the_first_question_only(monkeypatch, capsys):
    """``chat -i --image A --video B`` with no question on the command line: the first typed question carries
    both, the next one neither (a model that cannot take video is refused before the session starts)."""
    from vlmkit.cli_chat import run_interactive

    lines = iter(["What happens here?", "And then?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    session = RecordingSession()
    assert run_interactive(session, [], [PICTURE], ["clip.mp4"], "m") == 0
    first, second = session.asked
    assert [block["type"] for block in first[0]["content"]] == ["image", "video", "text"]
    assert first[0]["content"][1]["path"] == "clip.mp4"
    assert [block["type"] for block in second[-1]["content"]] == ["text"]


def test_text_that_is_not_utf8_is_an_error_and_the_session_goes_on():
    env = {key: value for key, value in os.environ.items() if key != "VLMKIT_MODEL"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", "vlmkit.cli", "chat", "-i", "--max-new-tokens", "2"],
                            capture_output=True, input=b"hi \xff\nWhat is it?\n/exit\n", timeout=300, env=env)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "Traceback" not in stderr and "error: the text is not valid UTF-8" in stderr
    assert len(answers(result.stdout.decode())) == 1  # the next question was answered


def test_a_temperature_too_small_to_divide_by_answers_greedily():
    greedy = run_chat("What is in this image?", "--image", PICTURE, "--max-new-tokens", "6")
    tiny = run_chat("What is in this image?", "--image", PICTURE, "--max-new-tokens", "6", "--temperature", "1e-320")
    assert tiny.returncode == 0 and "Traceback" not in tiny.stderr, tiny.stderr
    assert tiny.stdout == greedy.stdout


def test_a_question_too_long_for_the_context_is_refused_and_the_conversation_is_kept():
    # the refused question must not push the earlier turns (and their picture) out of the conversation:
    # the next question is answered as if the long one had never been typed
    session = f"/image {PICTURE}\nWhat is in this image?\nWhat colour is the shape?\n"
    long_line = "word " * 2000 + "\n"  # ~8000 tokens, far past the built-in model's 1024
    with_long = run_chat("-i", "--max-new-tokens", "12", stdin=session.replace("\nWhat colour", f"\n{long_line}What colour"))
    plain = run_chat("-i", "--max-new-tokens", "12", stdin=session)
    assert with_long.returncode == 0, with_long.stderr
    assert "error: the prompt is 8007 tokens long, longer than the model's context of 1024 tokens" in with_long.stderr
    assert "dropped" not in with_long.stderr and "without --image" not in with_long.stderr
    assert answers(with_long.stdout) == answers(plain.stdout) == ["a blue triangle on the right", "blue"]


def test_ctrl_c_during_an_answer_stops_that_answer_and_the_session_goes_on(monkeypatch, capsys):
    from vlmkit.cli_chat import run_interactive

    lines = iter(["A long question", "Another one", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    session = RecordingSession(interrupt_first=True)  # the first answer is interrupted (Ctrl-C)
    assert run_interactive(session, [], [], [], "m") == 0
    assert "answer stopped" in capsys.readouterr().err
    assert len(session.asked[1]) == 1  # the stopped question was not kept in the conversation


def test_an_image_that_does_not_open_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from vlmkit import cli
    from vlmkit.cli import main

    def load(*args, **kwargs):
        raise AssertionError("the model loaded before --image was checked")

    monkeypatch.setattr(cli, "_load_engine", load)
    fake = tmp_path / "photo.png"
    fake.write_text("not a picture")
    assert main(["chat", "--image", str(fake), "what is it?"]) == 1
    message = capsys.readouterr().err
    assert message.startswith("vlmkit: error: ") and "not an image" in message and str(fake) in message, message
