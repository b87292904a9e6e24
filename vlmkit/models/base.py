"""What every vision-language model class shares: loading from a checkpoint folder onto a device
in a dtype, the model-output container, the causal-LM loss, and the HF-style ``generate``."""

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError, InputError
from ..generation.config import GenerationConfig
from ..generation.decode import decode_one_token, prefill
from ..generation.loop import generate
from ..generation.outputs import FieldsOutput, transition_scores
from ..generation.prompt_cache import PromptCache
from ..io.checkpoint import checkpoint_location, materialize, read_json, resolve_dtype
from ..io.memory import keep_freed_blocks_for_reuse, move_to_huge_pages
from ..nn.layers import prepare_for_decoding
from .devices import resolve_device
from .fine_tuning import FineTuningMethods


class ModelOutput(FieldsOutput):
    """Forward results as transformers' causal-LM outputs (``out[0]`` is the loss when labels were given,
    else the logits). ``last_hidden_state`` (the decoder's normed output) is vlmkit's own, an attribute
    only, so the keys and positions stay transformers'."""

    FIELDS = ("loss", "logits", "past_key_values", "hidden_states", "attentions", "image_hidden_states")

    def __init__(self, last_hidden_state: torch.Tensor | None = None, **values):
        super().__init__(**values)
        self.__dict__["last_hidden_state"] = last_hidden_state


def kept_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The positions whose logits ``forward`` computes, as transformers reads ``logits_to_keep``: an int n
    keeps the last n (0: all), a tensor of indices keeps those positions."""
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden[:, logits_to_keep.to(hidden.device)]
    return hidden[:, -logits_to_keep:] if logits_to_keep else hidden


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                   weights: torch.Tensor | None = None, num_items_in_batch=None) -> torch.Tensor:
    """Mean next-token cross-entropy: position t predicts label t+1; ``ignore_index`` labels are skipped.
    ``weights`` (one per label, [B, T]) make it a weighted mean over the labels that count.
    ``num_items_in_batch`` (what transformers' Trainer passes under gradient accumulation): the sum over
    this batch's labels divided by the labels of all the accumulated batches, as transformers' loss does."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    if weights is None and num_items_in_batch is not None:
        summed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                                 reduction="sum")
        return summed / (num_items_in_batch.to(summed.device) if torch.is_tensor(num_items_in_batch)
                         else num_items_in_batch)
    if weights is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=ignore_index, reduction="none")
    weights = weights[:, 1:].to(losses) * (targets != ignore_index)
    return (losses * weights).sum() / weights.sum()


def _inputs_follow_the_model(model, args, kwargs):
    """Tensors given on another device move to the model's, as transformers' ``device_map`` hooks do."""
    device = model.device

    def move(value):
        return value.to(device) if isinstance(value, torch.Tensor) and value.device != device else value
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


class PretrainedVLM(FineTuningMethods, nn.Module):
    """Base of the families' top-level classes. A family provides ``config_from_folder`` (returns its
    config and the weight-name mapping for that layout), ``__init__(config)``, the text decoder as
    ``text_model``, ``lm_logits(hidden)`` and ``embed_inputs(input_ids, **model_inputs)``."""

    generation_config: GenerationConfig

    def __init__(self):
        super().__init__()
        self.register_forward_pre_hook(_inputs_follow_the_model, with_kwargs=True)

    @classmethod
    def from_pretrained(cls, name_or_path, *, dtype=None, torch_dtype=None, device_map=None, device=None,
                        revision: str = "main", quantization_config=None, attn_implementation: str | None = None,
                        use_flash_attention_2: bool | None = None, **unused):
        """Load a checkpoint from a folder or the local HF cache, in ``dtype`` ("auto" = the checkpoint's)
        onto one device, without materialising random weights first. As in transformers, ``config=`` loads
        the weights under a config given (``AutoConfig.from_pretrained(path)``, edited), and keywords that
        name the config's attributes set them (``vision_feature_select_strategy="full"``).

        ``quantization_config``: "int8"/"int4" (vlmkit's weight-only layers) or a ``BitsAndBytesConfig``
        (bitsandbytes' 8/4-bit layers, as transformers); weights are quantized as they stream in. A
        checkpoint saved quantized loads quantized. ``attn_implementation`` ("sdpa", "eager",
        "flash_attention_2") or ``use_flash_attention_2=True`` picks SDPA's kernels (see nn/attention_choice)."""
        from ..io.checkpoint import load_weights, weight_files
        from ..quant import BitsAndBytesConfig, quantizer_for, resolve_quantization
        from ..nn.attention_choice import apply_attn_implementation, resolve_attn_implementation

        folder = checkpoint_location(name_or_path, unused, revision)
        loading_info = unused.pop("output_loading_info", False)
        raw_config = read_json(folder / "config.json")
        config, layout = cls.config_from_folder(folder, raw_config)
        config = _config_with_overrides(cls, folder, config, unused.pop("config", None), unused)
        _reject_unsupported(unused)
        attention = resolve_attn_implementation(attn_implementation, use_flash_attention_2)
        quantization, pre_quantized = resolve_quantization(quantization_config, raw_config, folder)
        if hasattr(config, "check_sizes"):
            config.check_sizes()  # sizes the forward joins across sections, before any weight is read
        files = weight_files(folder)
        if unused.get("use_safetensors") and any(f.suffix != ".safetensors" for f in files):
            raise CheckpointError(f"use_safetensors=True, but {folder} holds its weights in .bin files only; "
                                  f"convert them (vlmkit convert) or leave the option out")
        target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, raw_config, files)
        target_device = resolve_device(device_map, device)
        with torch.device("meta"):
            model = cls(config)
        quantizer = quantizer_for(model, quantization, pre_quantized, files, layout, target_device, target_dtype)
        rename, optional = layout.rename, layout.optional
        if quantizer is not None:
            rename, optional = quantizer.wrap_rename(rename), optional + quantizer.optional
        unexpected: list[str] = []
        missing = load_weights(model, files, dtype=target_dtype, device=target_device, rename=rename,
                               ignore=layout.ignore, optional=optional, unexpected=unexpected)
        _warn_unexpected(folder, unexpected)
        if quantizer is not None:
            missing = quantizer.finish(model, missing)
        model.tie_missing_weights(missing)
        materialize(model, target_device)
        prepare_for_decoding(model)
        move_to_huge_pages(model)
        if torch.device(target_device).type == "cpu" or isinstance(quantization, BitsAndBytesConfig):
            # a prefill's activations (up to 32 MB each) would be fresh pages, faulted in one at a time, at
            # every use (9% of a LLaVA-OneVision-0.5B first token); bitsandbytes widens every weight into a
            # fresh tensor per token
            keep_freed_blocks_for_reuse()
        apply_attn_implementation(model, attention, target_device, target_dtype)
        model.quantization_config = quantization
        model.checkpoint_config = raw_config
        # what transformers' configs also say about the loaded model
        config.architectures, config._name_or_path = raw_config.get("architectures"), str(name_or_path)
        config.dtype = model.dtype
        model.config_at_load = config.to_dict()  # save_pretrained writes what changed since
        model.name_or_path = str(name_or_path)
        model.folder = folder
        model.generation_config = cls.default_generation_config(folder, config)
        if loading_info:  # every weight the model holds was loaded (anything missing is an error); extras skipped
            return model.eval(), {"missing_keys": [], "unexpected_keys": unexpected, "mismatched_keys": [],
                                  "error_msgs": []}
        return model.eval()

    def post_init(self) -> None:
        """The end of ``ModelClass(config)`` (weights random, as transformers' constructor leaves them), as
        transformers' ``post_init``: the LM head shares the input embedding where the config ties them, and the
        generation config holds the config's special token ids (``from_pretrained`` then puts the checkpoint's
        in its place). Sizes the forward would fail on are refused now, naming the keys."""
        self.config.text_config.check_sizes(f"{type(self.config).__name__}.text_config")
        if hasattr(self.config, "check_sizes"):
            self.config.check_sizes()
        if getattr(self.config, "tie_word_embeddings", False):
            self.tie_weights()
        text = self.config.text_config
        self.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                                  pad_token_id=text.pad_token_id)

    def save_pretrained(self, save_directory, **options) -> Path:
        """Write a checkpoint folder (config.json, model.safetensors, generation_config.json, the tokenizer/
        processor files) that ``from_pretrained`` loads back as it is; a quantized model stays quantized, with
        no need for the original weights. Tensor names follow the transformers layout; ``max_shard_size``
        ("5GB" by default) splits the weights into shards. A model built from a config (``ModelClass(config)``)
        writes that config as it is now, and no tokenizer files."""
        from ..io.saving import save_checkpoint
        return save_checkpoint(self, save_directory, **options)

    def tie_missing_weights(self, missing: set[str]) -> None:
        """Share the input embedding as the LM head when the checkpoint has no separate head."""
        if "lm_head.weight" in missing:
            self.lm_head.weight = self.text_model.embed_tokens.weight

    # --- transformers' PreTrainedModel methods that model code calls -----------------------------
    main_input_name = "input_ids"

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes the parameters (and buffers) take, as transformers' ``get_memory_footprint``."""
        tensors = [*self.parameters(), *(self.buffers() if return_buffers else ())]
        return sum(t.nelement() * t.element_size() for t in tensors)

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding (``inputs_embeds = model.get_input_embeddings()(input_ids)``)."""
        return self.text_model.embed_tokens

    @property
    def token_id_count(self) -> int:
        """How many token ids the model embeds (ids are 0 to this less one)."""
        return self.get_input_embeddings().num_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        """The LM head."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """transformers' ``resize_token_embeddings`` (see ``token_embeddings.py``): rows kept, added rows drawn
        near the old rows' mean, an untied LM head resized with them, ``vocab_size`` updated."""
        from .token_embeddings import resize_token_embeddings
        return resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of, mean_resizing)

    def refuse_resize(self) -> None:
        """Raises where this checkpoint's vocabulary cannot be resized (IDEFICS with image tokens)."""

    def get_decoder(self) -> nn.Module:
        """The text decoder (``model.model.language_model``; IDEFICS' is ``model.model``)."""
        return self.text_model

    def tie_weights(self, *args, **kwargs) -> None:
        """Share the input embedding as the LM head when the config asks for tied embeddings (as
        transformers' ``tie_weights``); otherwise nothing changes."""
        config = self.config
        if getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False):
            embedding = self.text_model.embed_tokens
            self.lm_head.weight = embedding.weight
            if getattr(self.lm_head, "additional_fc", None) is not None:  # IDEFICS' decoupled vocabulary
                self.lm_head.additional_fc.weight = embedding.additional_embedding.weight

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """How many parameters the model holds (tied ones once), as transformers' ``num_parameters``;
        ``exclude_embeddings`` leaves out the weights of embedding layers."""
        excluded = set()
        if exclude_embeddings:
            excluded = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in excluded and (p.requires_grad or not only_trainable))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations compute in (quantized layers hold integer weights beside it)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def max_context(self) -> int:
        """The longest sequence (prompt and new tokens) the model takes (see ``DecoderConfig.context_length``)."""
        return self.text_model.config.context_length

    # --- forward's transformers options ---------------------------------------------------------
    def run_text_model(self, inputs_embeds, attention_mask=None, position_ids=None, *, past_key_values=None,
                       use_cache=None, cache_position=None, output_hidden_states=None, output_attentions=None,
                       **text_inputs):
        """The decoder over ``inputs_embeds`` [B, T, H] as transformers' ``forward`` runs it: (hidden states
        [B, T, H], the KV cache or None, each layer's hidden states or None).

        ``past_key_values`` continues the cache a previous call returned (``attention_mask`` may cover the
        cached positions and the new ones, as transformers takes it, or the new ones only); with
        ``use_cache`` (by default in eval mode, as transformers' ``config.use_cache``) a new one is started.
        The cache grows as it is fed back, so a hand-written decoding loop needs nothing sized up front."""
        if output_attentions:
            raise InputError("output_attentions=True is not supported: vlmkit's attention runs fused kernels that "
                             "never form the attention maps; load the model with transformers to inspect them")
        if output_hidden_states not in (None, False, True):
            raise InputError(f"output_hidden_states takes True or False in vlmkit (got {output_hidden_states!r}); "
                             f"pass True and index the returned tuple")
        new_positions = inputs_embeds.shape[1]
        cache = self._forward_cache(past_key_values, use_cache, inputs_embeds)
        if cache is not None:
            start = cache.length
            if cache_position is not None and cache_position.reshape(-1).tolist() != list(
                    range(start, start + new_positions)):
                raise InputError(f"cache_position must continue the cache ({start}..{start + new_positions - 1}); "
                                 f"vlmkit's cache only appends: rewinding it is not supported")
            if attention_mask is not None and attention_mask.shape[1] == start + new_positions and start:
                attention_mask = attention_mask[:, start:]  # the cache keeps the mask of its positions
            elif attention_mask is not None and attention_mask.shape[1] != new_positions:
                raise InputError(f"attention_mask is {attention_mask.shape[1]} positions wide; with "
                                 f"{start} cached and {new_positions} new positions it must be "
                                 f"{start + new_positions} (or {new_positions}) wide")
            cache.reserve(start + new_positions)
        collected = [] if output_hidden_states else None
        hidden = self.text_model(inputs_embeds, position_ids, attention_mask, cache, all_hidden_states=collected,
                                 **text_inputs)
        return hidden, cache, None if collected is None else tuple(collected)

    def _forward_cache(self, past_key_values, use_cache, inputs_embeds):
        batch = inputs_embeds.shape[0]
        if past_key_values is not None and not hasattr(past_key_values, "reserve"):
            if getattr(past_key_values, "get_seq_length", lambda: None)() != 0:
                raise InputError("past_key_values must be the cache a previous call of this model returned "
                                 "(out.past_key_values); vlmkit does not read transformers' caches or tuples of "
                                 "tensors")
            past_key_values = None  # an empty transformers cache (DynamicCache()): start vlmkit's own
            use_cache = True
        if past_key_values is not None:
            if past_key_values.batch_size != batch:
                raise InputError(f"past_key_values holds {past_key_values.batch_size} row(s) but the inputs have "
                                 f"{batch}")
            return past_key_values
        if not (use_cache if use_cache is not None else not self.training):
            return None
        return self.new_cache(batch, inputs_embeds.shape[1])

    @staticmethod
    def forward_output(return_dict=None, **fields):
        """The forward's ``ModelOutput``, or its tuple with ``return_dict=False``."""
        output = ModelOutput(**fields)
        return output.to_tuple() if return_dict is False else output

    # --- what generation/ (decode.py, loop.py) uses --------------------------------------------
    def new_cache(self, batch_size: int, max_len: int):
        return self.text_model.new_cache(batch_size, max_len)

    # placeholder token ids that ``embed_inputs`` fills with media features; None: not declared (then a
    # reused prompt prefix still recomputes the embeddings of the whole prompt)
    media_token_ids: tuple[int, ...] | None = None

    @property
    def prompt_cache(self) -> PromptCache:
        """Keys/values of recent prompts, reused by a new prompt with the same start and media."""
        if "_prompt_cache" not in self.__dict__:
            self.__dict__["_prompt_cache"] = PromptCache()
        return self.__dict__["_prompt_cache"]

    def embed_prompt(self, input_ids, cache, **model_inputs) -> torch.Tensor:
        """The prompt's input embeddings for generation/decode.py's ``prefill``: the tokens' with the media
        features written over their placeholders (``embed_inputs``)."""
        return self.embed_inputs(input_ids, **model_inputs)

    def prefill(self, input_ids, attention_mask, position_ids, cache, **model_inputs):
        """generation/decode.py's ``prefill`` on this model (for callers that drive their own loop)."""
        return prefill(self, input_ids, attention_mask, position_ids, cache, **model_inputs)

    def decode(self, token_ids, position_ids, cache):
        """generation/decode.py's ``decode_one_token`` on this model (for callers that drive their own loop)."""
        return decode_one_token(self, token_ids, position_ids, cache)

    # --- the transformers-shaped entry point ---------------------------------------------------
    # ``model.generate(...)`` is the text generation loop itself (generation/loop.py), bound as a method:
    # generate -> decode_one_token (generation/decode.py) -> the decoder (nn/decoder.py), whose layers
    # call the attention
    generate = generate

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits: bool = False):
        """Each generated token's score [rows, new tokens] from ``generate(..., return_dict_in_generate=True,
        output_scores=True)``'s ``sequences``, ``scores`` (and ``beam_indices`` after beam search), as
        transformers' method of that name."""
        return transition_scores(sequences, scores, beam_indices, normalize_logits)

    def model_inputs(self, **kwargs) -> dict:
        """The keyword inputs ``prefill`` takes, moved to the model; unknown keys are an error."""
        accepted = self.accepted_inputs
        unknown = sorted(k for k in kwargs if k not in accepted and k not in self.ignored_inputs)
        if unknown:
            raise InputError(f"{type(self).__name__}.generate got unexpected argument(s): {', '.join(unknown)}")
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v)
                for k, v in kwargs.items() if k in accepted and v is not None}

    accepted_inputs: tuple[str, ...] = ()
    # inputs transformers' models take that change nothing here
    ignored_inputs: tuple[str, ...] = ("token_type_ids", "return_dict")

    @classmethod
    def default_generation_config(cls, folder: Path, config) -> GenerationConfig:
        text = config.text_config
        return GenerationConfig.from_pretrained(folder, bos_token_id=text.bos_token_id,
                                                eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)


# from_pretrained options of transformers that change nothing here at these values (None: at any value):
# vlmkit loads every weight onto one device, exactly (a missing or unexpected weight is an error), from
# safetensors when the checkpoint has them
NEUTRAL_LOADING_OPTIONS = {"low_cpu_mem_usage": None, "offload_folder": None, "offload_state_dict": None,
                           "offload_buffers": None, "use_safetensors": (None, True), "variant": (None,),
                           "ignore_mismatched_sizes": (False,), "max_memory": (None,),
                           "tp_plan": (None,), "tp_size": (None,), "key_mapping": (None,), "weights_only": (True,)}


def _config_with_overrides(cls, folder: Path, config, given, options: dict):
    """The config to build the model with: ``given`` (a config of this family, vlmkit's or transformers', or
    a dict in config.json's keys) in place of the folder's, then the ``options`` that name its attributes
    set on it (and taken out of ``options``), as transformers' ``from_pretrained`` does."""
    if given is not None and not isinstance(given, type(config)):
        values = given if isinstance(given, dict) else getattr(given, "to_dict", lambda: None)()
        if not isinstance(values, dict):
            raise InputError(f"from_pretrained: config must be a {type(config).__name__} (AutoConfig.from_pretrained)"
                             f", a transformers config or a dict; got {type(given).__name__}")
        given = cls.config_from_folder(folder, values)[0]
    config = given if given is not None else config
    for name in [k for k in options if k not in NEUTRAL_LOADING_OPTIONS and hasattr(config, k)]:
        setattr(config, name, options.pop(name))
    return config


def _reject_unsupported(options: dict) -> None:
    unsupported = sorted(k for k, v in options.items() if k not in NEUTRAL_LOADING_OPTIONS
                         or (NEUTRAL_LOADING_OPTIONS[k] is not None and v not in NEUTRAL_LOADING_OPTIONS[k]))
    if unsupported:
        shown = [f"{k}={options[k]!r}" for k in unsupported]
        raise InputError(f"from_pretrained got option(s) vlmkit does not support: "
                         f"{', '.join(s if len(s) <= 80 else s[:77] + '...' for s in shown)}")


def _warn_unexpected(folder: Path, names: list[str]) -> None:
    """Checkpoint tensors the model has no place for were skipped, as transformers skips them (with a warning)."""
    if names:
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        warnings.warn(f"{folder}: {len(names)} checkpoint tensor(s) this model does not use were skipped: {shown}",
                      stacklevel=3)
