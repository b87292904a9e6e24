"""What ``generate(..., return_dict_in_generate=True)`` returns, shaped as transformers' outputs."""

import torch


class FieldsOutput(dict):
    """Fields readable as attributes, keys, or by position among the fields that are set (as
    transformers' ``ModelOutput``); a field that was not asked for is None and not a key. Subclasses
    name their fields, in transformers' order, in ``FIELDS``."""

    FIELDS: tuple[str, ...] = ()

    def __init__(self, **values):
        unknown = set(values) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        super().__init__((name, values[name]) for name in self.FIELDS if values.get(name) is not None)

    def __getattr__(self, name):
        if name in self.FIELDS:
            return self.get(name)
        raise AttributeError(name)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        """The set fields in transformers' order (what ``return_dict=False`` returns)."""
        return tuple(self.values())


class GenerateDecoderOnlyOutput(FieldsOutput):
    """``sequences`` [batch, T]; ``scores``: one [batch, vocab] tensor of processed scores per step
    (``output_scores``); ``logits``: the raw logits per step (``output_logits``)."""

    FIELDS = ("sequences", "scores", "logits", "attentions", "hidden_states", "past_key_values")
    sequences: torch.Tensor


class GenerateBeamDecoderOnlyOutput(FieldsOutput):
    """Beam search's: ``sequences`` [batch * num_return_sequences, T]; ``sequences_scores`` (with
    ``output_scores``): each returned beam's length-penalised log-probability; ``scores``: the processed
    log-probabilities per step [batch * num_beams, vocab]; ``logits``: the raw logits per step;
    ``beam_indices``: for each returned sequence, the beam row each of its tokens came from."""

    FIELDS = ("sequences", "sequences_scores", "scores", "logits", "beam_indices", "attentions", "hidden_states",
              "past_key_values")
    sequences: torch.Tensor


def transition_scores(sequences: torch.Tensor, scores: tuple[torch.Tensor, ...], beam_indices: torch.Tensor | None = None,
                      normalize_logits: bool = False) -> torch.Tensor:
    """The score of each generated token [rows, new tokens] from ``generate``'s ``scores`` (and, after beam
    search, ``beam_indices``), as transformers' ``compute_transition_scores``; steps after a beam ended are 0."""
    vocab = scores[0].shape[-1]
    if beam_indices is None:  # greedy or sampling: row i's tokens always come from row i
        beam_indices = torch.arange(scores[0].shape[0], device=sequences.device).view(-1, 1).expand(-1, len(scores))
    stacked = torch.stack(scores).reshape(len(scores), -1).transpose(0, 1)  # [rows * vocab, steps]
    if normalize_logits:
        stacked = stacked.reshape(-1, vocab, stacked.shape[-1]).log_softmax(dim=1).reshape(-1, stacked.shape[-1])
    ended = beam_indices < 0
    longest = int((~ended).long().sum(-1).max())
    beam_indices, ended = beam_indices.clone()[:, :longest], ended[:, :longest]
    beam_indices[ended] = 0
    indices = sequences[:, sequences.shape[-1] - longest:] + beam_indices * vocab
    result = stacked.gather(0, indices)
    result[ended] = 0
    return result
