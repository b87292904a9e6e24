"""Training-only losses that teach the LM to look up the object a question asks about.

"Where is the red circle?" needs the answer position to know what the question names (colour red,
shape circle) and one attention head to find the image tokens that show it; trained on answers
alone, a small LM learns neither and answers about the other object of a pair (docs/builtin_model.md).
``question_label_loss`` supervises the first, ``binding_attention_loss`` the second; both read one
decoder layer's input, recorded during the ordinary forward (``ForwardRecord``)."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..nn.rotary import rotate
from ..train.batches import IGNORE
from .label_heads import label_loss, label_tensors, named_classes
from .shapes import patch_labels


def binding_layer(stage, model) -> int:
    """The decoder layer whose attention ``stage.binding_attention_weight`` teaches (default: the middle
    one: earlier layers gather the question's words into the answer position, later ones read out)."""
    count = len(model.text_model.layers)
    layer = count // 2 if stage.binding_attention_layer is None else stage.binding_attention_layer
    heads = model.config.text_config.num_attention_heads
    if not 0 <= layer < count or not 0 <= stage.binding_attention_head < heads:
        raise InputError(f"lm.binding_attention_layer must name one of the LM's {count} layers and "
                         f"lm.binding_attention_head one of its {heads} heads (counting from 0)")
    return layer


class ForwardRecord:
    """A context manager that keeps what ``module`` receives (``args``) and returns (``output``) in the
    forwards run inside it: training losses read a layer's inputs or features without a second pass."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.args = self.output = None

    def __enter__(self) -> "ForwardRecord":
        self._handle = self.module.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _keep(self, module, args, output) -> None:
        self.args, self.output = args, output


def answer_query_positions(labels: torch.Tensor) -> list[list[int]]:
    """Per row, the positions whose logits predict each answer's first token (each run of labels
    starts one after)."""
    labelled = labels != IGNORE
    starts = labelled[:, 1:] & ~labelled[:, :-1]
    return [row.nonzero().flatten().tolist() for row in starts]


def asked_objects(examples, labels: torch.Tensor) -> list[tuple[int, int, int, str]]:
    """(row, query position, subject, question) for every answer in the batch whose question asks
    about one object of its scene (see ``answer_query_positions``)."""
    out = []
    for row, (example, queries) in enumerate(zip(examples, answer_query_positions(labels))):
        if not example.subjects:
            continue
        questions = [m["content"] for m in example.messages if m["role"] == "user"]
        out += [(row, position, subject, question)
                for position, subject, question in zip(queries, example.subjects, questions) if subject is not None]
    return out


def binding_attention_loss(record: ForwardRecord, head: int, input_ids: torch.Tensor, labels: torch.Tensor,
                           examples, image_token_id: int, image_size: int, patch: int) -> torch.Tensor | None:
    """Mean, over answers whose question asks about one object, of -log(the attention weight that
    ``head`` of the recorded attention layer gives that object's image tokens from the position
    predicting the answer). None when no answer in the batch asks about one object."""
    rows, positions, targets = [], [], []
    cells = {}
    for row, position, subject, _ in asked_objects(examples, labels):
        if row not in cells:
            cells[row] = torch.tensor(patch_labels(examples[row].scene, image_size, patch), device=input_ids.device)
        image_positions = (input_ids[row] == image_token_id).nonzero().flatten()
        target = torch.zeros(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
        target[image_positions[cells[row] == subject + 1]] = True
        if target.any():
            rows.append(row)
            positions.append(position)
            targets.append(target)
    if not rows:
        return None
    hidden, (cos, sin) = record.args[0], record.args[1]  # the layer's normed input, rotary cos/sin
    attention = record.module
    rows_t, positions_t = torch.tensor(rows, device=labels.device), torch.tensor(positions, device=labels.device)
    dim, group = attention.head_dim, attention.num_heads // attention.num_kv_heads
    query = attention.q_proj(hidden[rows_t, positions_t])[:, head * dim:(head + 1) * dim]
    query = rotate(query, cos[rows_t, positions_t], sin[rows_t, positions_t])
    # keys once per row (a row holds up to one answer per question), then one copy per answer
    key_rows, answer_row = rows_t.unique(return_inverse=True)
    keys = attention.k_proj(hidden[key_rows])[..., (head // group) * dim:(head // group + 1) * dim]
    keys = rotate(keys, cos[key_rows], sin[key_rows])[answer_row]  # [answers, seq, head_dim]
    scores = (keys @ query[:, :, None]).squeeze(-1) * dim ** -0.5  # [answers, seq]
    future = torch.arange(scores.shape[1], device=scores.device)[None] > positions_t[:, None]
    log_weights = scores.float().masked_fill(future, float("-inf")).log_softmax(-1)
    return -log_weights.masked_fill(~torch.stack(targets), float("-inf")).logsumexp(-1).mean()


def question_label_loss(head: torch.nn.Module, record: ForwardRecord, labels: torch.Tensor,
                        examples) -> dict | None:
    """``label_loss`` at the answer positions of questions about one object: the recorded
    attention layer's input there predicts what the question names (``label_heads.named_classes``), which its
    queries need to look the object up. None when no answer in the batch asks about one object."""
    asked = asked_objects(examples, labels)
    if not asked:
        return None
    rows = torch.tensor([row for row, *_ in asked], device=labels.device)
    positions = torch.tensor([position for _, position, *_ in asked], device=labels.device)
    features = record.args[0][rows, positions][:, None]  # [answers, 1, hidden]
    named = [{name: [value] for name, value in named_classes(question).items()} for *_, question in asked]
    return label_loss(head, features, label_tensors(named, labels.device))
