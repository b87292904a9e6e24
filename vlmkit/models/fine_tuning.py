"""What transformers' fine-tuning code (its Trainer, PEFT) calls on a model besides the forward: activation
checkpointing and gradients into frozen embeddings. ``PretrainedVLM`` takes these from here."""

from ..errors import InputError


class FineTuningMethods:
    """For a model with ``text_model`` (nn/decoder.py's DecoderModel) and ``get_input_embeddings``."""

    # transformers' name of the loss the forward computes from ``labels`` (next-token cross-entropy, labels
    # shifted): its Trainer counts the labels that are predicted, ``labels[..., 1:]``, for ``num_items_in_batch``
    loss_type = "ForCausalLM"

    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute decoder layers' activations in the backward pass instead of keeping them (training with
        less memory; the gradients are the same): every ``every_n_layers``-th layer, the activations kept for
        the recompute in host memory with ``offload``. Only in train mode, with gradients on (transformers 5's
        name, which its Trainer calls)."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False):
            raise InputError("gradient_checkpointing_kwargs: vlmkit checkpoints without reentrant autograd "
                             "(use_reentrant=False); leave use_reentrant out")
        if kwargs:
            raise InputError(f"gradient_checkpointing_kwargs: {sorted(kwargs)} are not supported")
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise InputError(f"every_n_layers must be a whole number of at least 1, got {every_n_layers!r}")
        text = self.text_model
        text.gradient_checkpointing, text.checkpoint_every, text.checkpoint_offload = True, every_n_layers, offload

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options) -> None:
        """transformers' older name of ``activation_checkpointing_enable``."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def activation_checkpointing_disable(self) -> None:
        self.text_model.gradient_checkpointing = False

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.text_model.gradient_checkpointing

    is_gradient_checkpointing = is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        """Make the token embeddings' output require gradients, so gradient checkpointing and adapters train
        with the embeddings frozen (transformers' ``enable_input_require_grads``)."""
        def require_grads(module, inputs, output):
            output.requires_grad_(True)
        self._input_grads_hook = self.get_input_embeddings().register_forward_hook(require_grads)

    def disable_input_require_grads(self) -> None:
        hook = getattr(self, "_input_grads_hook", None)
        if hook is not None:
            hook.remove()
            self._input_grads_hook = None
