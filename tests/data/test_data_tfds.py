"""The TFDS builder of the TL;DR comparisons (array_record, read without TensorFlow)."""

import json
import sys

import numpy as np
import pytest

_WHY = "format='tfds' needs the tfds extra: pip install -e '.[tfds]' (.ci/run installs it)"
pytest.importorskip("tensorflow_datasets", reason=_WHY)
pytest.importorskip("array_record", reason=_WHY)

from daa_jax.errors import DataError  # pylint: disable=g-import-not-at-top
from daa_jax.data import pipeline as data_pipeline


def comparison(i, split):
  return {"info": {"id": f"t3_{i}", "post": f"Post number {i}, with some text.",
                   "title": f"Title {i}", "subreddit": "tifu"},
          "split": split, "choice": i % 2,
          "summaries": [{"text": f" summary A{i}"}, {"text": f"summary B{i}"}]}


def write_comparisons(directory, rows):
  directory.mkdir(exist_ok=True)
  with open(directory / "batch1.json", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def config(tmp_path, source, fmt):
  cfg = data_pipeline.default_config()
  cfg.source, cfg.format = str(source), fmt
  cfg.max_length, cfg.max_prompt_length = 96, 64
  cfg.cache_dir = str(tmp_path / "cache")
  return cfg


def test_tfds_matches_the_json_reader(tmp_path):
  manual = tmp_path / "manual"
  rows = [comparison(i, "valid1" if i % 4 == 0 else "train") for i in range(12)]
  rows.insert(3, {"info": {"id": "cnn", "article": "CNN text", "post": None}, "split": "valid2",
                  "summaries": [{"text": "x"}, {"text": "y"}], "choice": 0})
  write_comparisons(manual, rows)
  for split in ("train", "eval"):
    via_tfds = data_pipeline.load_pairs(config(tmp_path, manual, "tfds"), split)
    via_json = data_pipeline.load_pairs(config(tmp_path, manual, "tldr"), split)
    assert len(via_tfds) == len(via_json) == (9 if split == "train" else 3)
    assert via_tfds.prompt_texts == via_json.prompt_texts
    assert via_tfds.chosen_texts == via_json.chosen_texts
    assert via_tfds.rejected_texts == via_json.rejected_texts
    assert via_tfds.stats["skipped_other_domain"] == 1
    indices = np.arange(len(via_tfds))
    np.testing.assert_array_equal(via_tfds.batch(indices)["tokens"],
                                  via_json.batch(indices)["tokens"])
  assert "tensorflow" not in sys.modules  # tfds.data_source reads array_record without TF.
  prepared = list((tmp_path / "cache" / "tfds").glob("*/tldr_comparisons/1.0.0/*array_record*"))
  assert prepared
  # A prepared data dir is a source too.
  data_dir = prepared[0].parents[2]
  assert len(data_pipeline.load_pairs(config(tmp_path, data_dir, "tfds"), "train")) == 9


def test_tfds_prepare_validates_rows(tmp_path):
  manual = tmp_path / "manual"
  bad = comparison(1, "train")
  bad["choice"] = 2
  write_comparisons(manual, [comparison(0, "train"), bad])
  with pytest.raises(DataError, match=r"batch1\.json, line 2: 'choice' is 2"):
    data_pipeline.load_pairs(config(tmp_path, manual, "tfds"), "train")
