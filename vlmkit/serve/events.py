"""What a scheduler job reports to its listener and to ``Job.wait()``: text as it comes, each choice's
end, and the job's end (its outcome, or the error that failed it). Apart from the scheduler so that
what listens (the app, image streaming) need not import the scheduler."""

from dataclasses import dataclass


@dataclass
class TextDelta:
    index: int
    text: str
    logprobs: list[dict] | None = None  # OpenAI's logprobs entries of the tokens this text completes


@dataclass
class ChoiceEnd:
    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[dict] | None = None  # every entry of the answer (when asked for)
    last_logprobs: list[dict] | None = None  # the entries not sent with a TextDelta yet (streaming)
    tool_calls: list[dict] | None = None  # OpenAI's tool_calls, when the answer is a forced tool call


@dataclass
class ChatOutcome:
    prompt_tokens: int
    choices: list[ChoiceEnd]

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)


@dataclass
class ImageOutcome:
    images: list  # PIL images


@dataclass
class JobEnd:
    outcome: ChatOutcome | ImageOutcome


@dataclass
class JobFailed:
    error: BaseException
