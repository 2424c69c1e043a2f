"""data.eval_mode = "trainer": the eval loss the run logs equals what transformers'
Trainer.evaluate() (the platform's validator) reports for the exported model on the same held-out
rows: over-long rows left out, each eval batch scored by its token mean, the means averaged
weighted by the batches' rows (the last batch is partial here)."""

import json

import numpy as np
import pytest

from covenant_jax.data import pipeline, templates
from covenant_jax.train import loop
from tests.data import common as data_common
from tests.train import common

SEQ, EVAL_ROWS, EVAL_BATCH = 32, 11, 4


def _rows(n=48):
    # Lengths 9..~50 tokens, so several eval rows are over SEQ and rows per batch vary in tokens.
    return [data_common.chat_row(i, n_user=1 + (i * 7) % 23, n_asst=1 + (i * 5) % 17) for i in range(n)]


def _trainer_eval_loss(export_dir, tokenizer, rows) -> float:
    """The reference: the held-out rows as the platform tokenises them (labels -100 where not
    trained, rows over SEQ dropped), in order, scored by Trainer.evaluate()."""
    import datasets
    import torch
    import transformers

    _, held_out = pipeline.split_eval(len(rows), 0.0, EVAL_ROWS, seed=(0, 0))
    tpl = templates.ChatTemplate(tokenizer, "chatml")
    examples = []
    for i in held_out:
        ids, trained = templates.encode_chat(tpl, rows[i]["messages"])
        if len(ids) <= SEQ:
            labels = np.where(trained, ids, -100)
            examples.append(
                {"input_ids": ids.tolist(), "labels": labels.tolist(), "attention_mask": [1] * len(ids)}
            )
    assert 2 * EVAL_BATCH < len(examples) < EVAL_ROWS  # some dropped; a partial last batch
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    args = transformers.TrainingArguments(
        output_dir=str(export_dir.parent / "hf_eval"),
        report_to=[],
        per_device_eval_batch_size=EVAL_BATCH,
        use_cpu=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        eval_dataset=datasets.Dataset.from_list(examples),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    losses = [
        model(**{k: torch.tensor([v]) for k, v in e.items()}, num_items_in_batch=1).loss.item()
        for e in examples
    ]  # per row: summed token loss
    token_mean = sum(losses) / sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
    return trainer.evaluate()["eval_loss"], token_mean


def test_trainer_eval_mode_equals_trainer_evaluate_on_the_export(tmp_path):
    model_dir = common.tiny_model_dir(tmp_path, initializer_range=0.5)  # losses that vary by token
    rows = _rows()
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    cfg = common.tiny_recipe(tmp_path, model_dir, data, steps=2, eval_every=2, export=True)
    cfg.data.update(
        template="chatml", seq_len=SEQ, eval_count=EVAL_ROWS, eval_mode="trainer", eval_batch_size=EVAL_BATCH
    )
    ours = loop.train(cfg)  # evaluates the state of step 2, which it exports
    reference, token_mean = _trainer_eval_loss(ours.export_dir, data_common.word_tokenizer(), rows)
    np.testing.assert_allclose(ours.eval_loss, reference, rtol=2e-5)
    assert abs(token_mean - reference) > 1e-3  # the test tells the two averages apart


def test_trainer_eval_batches_are_the_same_rows_on_any_number_of_processes():
    """Every process packs each Trainer batch alike and feeds its slice: joined, the slices are
    the one-process batches, so the collective eval sees the same rows."""
    cfg = dict(
        sources=[{"dataset": _rows()}],
        template="chatml",
        seq_len=SEQ,
        batch_size=4,
        eval_count=EVAL_ROWS,
        eval_mode="trainer",
        eval_batch_size=EVAL_BATCH,
    )
    tok = data_common.word_tokenizer()
    one = pipeline.build_pipeline(cfg, tok, process_index=0, process_count=1)
    two = [pipeline.build_pipeline(cfg, tok, process_index=i, process_count=2) for i in (0, 1)]
    assert one.report.sources[0].eval_dropped > 0
    assert len(one.eval) == -(-one.report.sources[0].eval // EVAL_BATCH)
    for (rows, whole), *halves in zip(one.eval, *(t.eval for t in two), strict=True):
        assert all(n == rows for n, _ in halves) and 0 < rows <= EVAL_BATCH
        for batch, *parts in zip(whole, *(h for _, h in halves), strict=True):
            for k in batch:
                np.testing.assert_array_equal(batch[k], np.concatenate([p[k] for p in parts]))


@pytest.mark.parametrize("bad", [{"eval_mode": "platform"}, {"eval_batch_size": 0}])
def test_eval_settings_are_checked(bad):
    cfg = dict(sources=[{"dataset": _rows(8)}], template="chatml", seq_len=SEQ, **bad)
    with pytest.raises(ValueError, match=f"data.{next(iter(bad))}"):
        pipeline.build_pipeline(cfg, data_common.word_tokenizer(), process_index=0, process_count=1)
