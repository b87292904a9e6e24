"""transformers' Trainer trains a vlmkit model as it trains transformers' own: the same logged losses and
gradient norms with gradient accumulation (the loss follows the Trainer's ``num_items_in_batch``, counted
over the predicted labels), and with its activation checkpointing switched on."""

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _collator(processor):
    def collate(rows):
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]) for row in rows]
        batch = dict(processor(text=texts, images=[row["image"] for row in rows], padding=True, return_tensors="pt"))
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch
    return collate


def _train(model, processor, tmp_path, **arguments) -> list[tuple[float, float]]:
    rng = np.random.default_rng(0)
    data = [{"image": Image.fromarray(rng.integers(0, 256, (30, 40 + i, 3), dtype=np.uint8)),
             "answer": "picture number " + "x " * i} for i in range(8)]  # answers of different lengths
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="no", remove_unused_columns=False, disable_tqdm=True, seed=0, data_seed=0,
        **arguments)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=_collator(processor))
    trainer.train()
    return [(round(h["loss"], 4), round(h["grad_norm"], 4)) for h in trainer.state.log_history if "grad_norm" in h]


def test_gradient_accumulation_and_checkpointing_train_as_transformers_model(janus_dir, tmp_path):
    from vlmkit import JanusForConditionalGeneration, JanusProcessor

    processor = JanusProcessor.from_pretrained(janus_dir)
    reference = transformers.JanusForConditionalGeneration.from_pretrained(str(janus_dir), dtype=torch.float32)
    want = _train(reference, processor, tmp_path / "reference", gradient_accumulation_steps=2)
    got = _train(JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32), processor,
                 tmp_path / "ours", gradient_accumulation_steps=2)
    assert got == want and len(got) == 2
    model = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=torch.float32)
    checkpointed = _train(model, processor, tmp_path / "checkpointed", gradient_accumulation_steps=2,
                          activation_checkpointing=True, activation_checkpointing_kwargs={"every_n_layers": 2})
    assert model.is_activation_checkpointing and model.text_model.checkpoint_every == 2
    assert checkpointed == want
