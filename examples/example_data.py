"""Datasets for the examples: embedded offline defaults and tensorflow-datasets.

Offline defaults (nothing is downloaded):
* text `"pydoc"`: the help topics that ship with Python (`pydoc_data.topics`),
  about 0.46M characters of English technical prose;
* images `"digits"`: scikit-learn's 1797 handwritten digits (8x8, 10 classes).

`"tfds:NAME"` (optionally `"tfds:NAME:SPLIT"`) reads any tensorflow-datasets
dataset through `tfds.data_source` (no TensorFlow needed), e.g.
`tfds:tiny_shakespeare`, `tfds:lm1b`, `tfds:cifar10`, `tfds:mnist`, from the
tfds data dir (`data_dir`; default `$TFDS_DATA_DIR` or
`~/tensorflow_datasets`). A dataset that is not prepared there is an error
at once (`DataNotAvailableError`), unless `download=True` (needs internet)
downloads and prepares it into that data dir.

Batches are drawn statelessly: the batch of step `t` depends only on
`(seed, t)`, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

TEXT_DEFAULT = "pydoc"
IMAGE_DEFAULT = "digits"


def _parse_tfds(spec: str, default_split: str) -> tuple[str, str]:
  parts = spec.split(":", 2)
  if len(parts) < 2 or not parts[1]:
    raise ValueError(f"dataset: expected 'tfds:NAME[:SPLIT]', got {spec!r}.")
  return parts[1], parts[2] if len(parts) == 3 else default_split


class DataNotAvailableError(RuntimeError):
  """A tfds dataset that is not prepared in the data dir (and no download)."""


def _tfds():
  try:
    import tensorflow_datasets as tfds  # Optional, only for tfds: datasets.
  except ImportError as e:
    raise DataNotAvailableError(
      f"dataset: tfds datasets need tensorflow-datasets ({e}); install the "
      "examples extra: pip install -e '.[examples]'."
    ) from e
  return tfds


def _quiet_absl():
  """tfds logs a warning per missing version folder: keep errors only."""
  import logging

  logging.getLogger("absl").setLevel(logging.ERROR)


def _tfds_builder(name: str, data_dir: Optional[str], download: bool):
  """The dataset's builder; checks that it is prepared unless `download`.

  Checking first keeps an offline machine from retrying downloads for
  minutes: without `download`, nothing goes to the network.
  """
  tfds = _tfds()
  _quiet_absl()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataNotAvailableError(
      f"dataset: tensorflow-datasets has no dataset {name!r}."
    ) from e
  if not download and not builder.is_prepared():
    where = data_dir or (
      "the default tfds data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    raise DataNotAvailableError(
      f"dataset: tfds:{name} is not prepared in {where} (looked for "
      f"{builder.data_dir}); pass --download to download and prepare it "
      "there (needs internet), or --data-dir DIR where it is prepared."
    )
  return builder


def _tfds_source(
  name: str, split: str, data_dir: Optional[str] = None, download: bool = False
):
  _tfds_builder(name, data_dir, download)
  return _tfds().data_source(
    name, split=split, data_dir=data_dir, download=download
  )


# ---------------------------------------------------------------------------
# Text


def _as_str(x) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8", errors="replace")
  if isinstance(x, np.ndarray):
    return _as_str(x.item())
  return str(x)


def load_text(
  dataset: str = TEXT_DEFAULT,
  *,
  max_chars: Optional[int] = None,
  split: Optional[str] = None,
  data_dir: Optional[str] = None,
  download: bool = False,
) -> str:
  """Returns the raw text of a dataset.

  Args:
    dataset: `"pydoc"` or `"tfds:NAME[:SPLIT]"` (a dataset with a text
      feature, e.g. `text`).
    max_chars: stop reading after this many characters (`None`: all).
    split: split to read for tfds (overrides the one in `dataset`).
    data_dir: the tfds data dir (`None`: tfds's default).
    download: download and prepare a tfds dataset missing from `data_dir`.

  Returns:
    The text, records separated by blank lines.

  Raises:
    DataNotAvailableError: a tfds dataset that is not prepared (and no
      `download`), or tensorflow-datasets is not installed.
  """
  if dataset == TEXT_DEFAULT:
    from pydoc_data import topics  # Ships with CPython.

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return text[:max_chars] if max_chars else text
  if not dataset.startswith("tfds:"):
    raise ValueError(
      f"dataset: expected {TEXT_DEFAULT!r} or 'tfds:NAME[:SPLIT]', got "
      f"{dataset!r}."
    )
  name, default_split = _parse_tfds(dataset, "train")
  source = _tfds_source(name, split or default_split, data_dir, download)
  pieces, total = [], 0
  for i in range(len(source)):
    record = source[i]
    key = (
      "text"
      if "text" in record
      else next(k for k, v in record.items() if isinstance(v, (str, bytes)))
    )
    piece = _as_str(record[key])
    pieces.append(piece)
    total += len(piece) + 2
    if max_chars and total >= max_chars:
      break
  text = "\n\n".join(pieces)
  return text[:max_chars] if max_chars else text


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Byte-level (`vocab=None`, 256 symbols) or character-level tokenizer."""

  chars: Optional[str] = None  # Character vocabulary; None = bytes.

  @classmethod
  def fit(cls, text: str, level: str) -> "Tokenizer":
    if level == "byte":
      return cls(None)
    if level == "char":
      return cls("".join(sorted(set(text))))
    raise ValueError(f"tokenizer: expected 'byte' or 'char', got {level!r}.")

  @property
  def vocab_size(self) -> int:
    return 256 if self.chars is None else len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    if self.chars is None:
      return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    table = {c: i for i, c in enumerate(self.chars)}
    return np.fromiter((table.get(c, 0) for c in text), np.int32, len(text))

  def decode(self, ids) -> str:
    if self.chars is None:
      return bytes(np.asarray(ids, np.uint8).tolist()).decode(
        "utf-8", errors="replace"
      )
    return "".join(self.chars[int(i)] for i in ids)


def split_tokens(
  tokens: np.ndarray, val_fraction: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
  """Train / validation split: the last `val_fraction` of the stream."""
  cut = int(len(tokens) * (1.0 - val_fraction))
  return tokens[:cut], tokens[cut:]


def lm_batch(
  tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int
) -> np.ndarray:
  """Random windows of `seq_len + 1` tokens; depends only on (seed, step)."""
  if len(tokens) <= seq_len + 1:
    raise ValueError(
      f"seq_len: {seq_len} needs more than {seq_len + 1} tokens, the data "
      f"has {len(tokens)}."
    )
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
  return tokens[starts[:, None] + np.arange(seq_len + 1)]


def lm_eval_batches(
  tokens: np.ndarray, num_batches: int, batch_size: int, seq_len: int, seed: int
) -> list[np.ndarray]:
  """A fixed set of validation batches (the same for every evaluation)."""
  return [
    lm_batch(tokens, 10**9 + i, batch_size, seq_len, seed)
    for i in range(num_batches)
  ]


# ---------------------------------------------------------------------------
# Images


@dataclasses.dataclass
class ImageData:
  train_x: np.ndarray  # (N, H, W, C) float32, standardized.
  train_y: np.ndarray  # (N,) int32.
  val_x: np.ndarray
  val_y: np.ndarray
  num_classes: int


def _standardize(train: np.ndarray, val: np.ndarray):
  mean = train.mean(axis=(0, 1, 2), keepdims=True)
  std = train.std(axis=(0, 1, 2), keepdims=True) + 1e-6
  return (train - mean) / std, (val - mean) / std


def load_images(
  dataset: str = IMAGE_DEFAULT,
  *,
  max_examples: Optional[int] = None,
  seed: int = 0,
  data_dir: Optional[str] = None,
  download: bool = False,
) -> ImageData:
  """Loads an image-classification dataset into memory.

  Args:
    dataset: `"digits"` (scikit-learn, offline; a fixed 80/20 split) or
      `"tfds:NAME"` (uses the `train` and `test` splits, features `image` and
      `label`, e.g. `tfds:cifar10`).
    max_examples: keep at most this many training (and validation) examples.
    seed: seed of the digits split.
    data_dir: the tfds data dir (`None`: tfds's default).
    download: download and prepare a tfds dataset missing from `data_dir`.

  Returns:
    An `ImageData`.

  Raises:
    DataNotAvailableError: as `load_text`.
  """
  if dataset == IMAGE_DEFAULT:
    from sklearn.datasets import load_digits  # Ships with scikit-learn.

    digits = load_digits()
    x = digits.images.astype(np.float32)[..., None] / 16.0
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    tr, va = perm[:cut], perm[cut:]
    train_x, val_x, train_y, val_y, num_classes = x[tr], x[va], y[tr], y[va], 10
  elif dataset.startswith("tfds:"):
    name, _ = _parse_tfds(dataset, "train")
    arrays = []
    for split in ("train", "test"):
      source = _tfds_source(name, split, data_dir, download)
      n = len(source) if not max_examples else min(len(source), max_examples)
      records = [source[i] for i in range(n)]
      arrays.append(
        (
          np.stack([np.asarray(r["image"]) for r in records]).astype(np.float32)
          / 255.0,
          np.array([int(r["label"]) for r in records], np.int32),
        )
      )
    (train_x, train_y), (val_x, val_y) = arrays
    num_classes = (
      _tfds_builder(name, data_dir, True).info.features["label"].num_classes
    )
  else:
    raise ValueError(
      f"dataset: expected {IMAGE_DEFAULT!r} or 'tfds:NAME', got {dataset!r}."
    )
  if max_examples:
    train_x, train_y = train_x[:max_examples], train_y[:max_examples]
    val_x, val_y = val_x[:max_examples], val_y[:max_examples]
  train_x, val_x = _standardize(train_x, val_x)
  return ImageData(train_x, train_y, val_x, val_y, int(num_classes))


def image_batch(
  data: ImageData, step: int, batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """A random training batch; depends only on (seed, step)."""
  idx = np.random.default_rng([seed, step]).integers(
    0, len(data.train_x), size=batch_size
  )
  return data.train_x[idx], data.train_y[idx]


def image_eval_batches(
  data: ImageData, batch_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
  """The validation set in fixed batches (the last one may be smaller)."""
  return [
    (data.val_x[i : i + batch_size], data.val_y[i : i + batch_size])
    for i in range(0, len(data.val_x), batch_size)
  ]
