"""Data: sources (JSONL + images, COCO captions, TFDS, generated shapes), transforms, grain pipelines, inspector.

make_train_iter(config.input, tok)                 endless, shuffled, sharded, resumable training batches
make_eval_batches(data, config.input, tok, bs)     one pass over a split, last batch padded with `_mask`
format_batch_table(batch, tok) / check_batch(...)   what the model will see, and the invariants it needs
"""

from paligemma_ft.data.inspect import check_batch, format_batch_table, inspect_main
from paligemma_ft.data.pipeline import (
    BadInputReport,
    InputConfig,
    TrainIterator,
    local_batch_size,
    make_eval_batches,
    make_train_iter,
    num_eval_batches,
    num_eval_examples,
)
from paligemma_ft.data.shapes import ShapesSource, make_example, write_shapes_folder
from paligemma_ft.data.sources import CocoSource, JsonlSource, TfdsSource, make_source
from paligemma_ft.data.transforms import BadExample, decode_image, resize, tokenize_prompt, tokenize_train, value_range

__all__ = [
    "BadExample",
    "BadInputReport",
    "CocoSource",
    "InputConfig",
    "JsonlSource",
    "ShapesSource",
    "TfdsSource",
    "TrainIterator",
    "check_batch",
    "decode_image",
    "format_batch_table",
    "inspect_main",
    "local_batch_size",
    "make_eval_batches",
    "make_example",
    "make_source",
    "make_train_iter",
    "num_eval_batches",
    "num_eval_examples",
    "resize",
    "tokenize_prompt",
    "tokenize_train",
    "value_range",
    "write_shapes_folder",
]
