"""mergekit's ``tokenizer_source`` / ``tokenizer: {source}`` and ``chat_template`` keys.

mergekit 0.1.5 (``tokenizer/build.py``, ``embed.py``) builds the output vocabulary and
permutes every model's embedding and LM-head rows onto it; jmerge does the same, from the
``tokenizer.json`` files alone (headers, no tensor read):

* ``base``: the base's vocabulary (tokens with an id below its ``vocab_size``);
* a model's path: that model's vocabulary;
* ``union``: the base's tokenizer, then every model's tokens it lacks added with
  ``tokenizers``' ``add_tokens`` (regular tokens first, then added tokens with their
  settings), in the config's order: base, then ``models`` as listed (mergekit visits the models
  in the order of a Python set, so its new ids can differ from run to run; the rows per token do not).

Row ``i`` of model ``m``'s remapped tensor is row ``p_m(i)`` of its own, where ``p_m`` maps the
output token to its id in ``m``. A token some model lacks takes, in that model (mergekit's
``assign_embedding_sources``): the row of the one model that has it; else the base_model's row
when the base has it; else the mean of the rows of the models that have it (zero when none
does). A union in which two models add the same token with different settings (``special``,
``lstrip``, ``rstrip``, ``normalized``, ``single_word``) is refused, naming both (mergekit
warns and keeps the first model's, in its set order). When every vocabulary equals the
base's, the permutation is the identity and the merge is unchanged.

``chat_template``: a Jinja template (text with ``{``), ``auto`` (the template most models
carry, as mergekit picks it) or one of mergekit 0.1.5's built-in names (:data:`CHAT_TEMPLATES`),
written to the output's ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from jmerge.config.schema import ConfigError, closest

_TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
               "merges.txt", "chat_template.jinja")
# tensors indexed by token id along axis 0 (mergekit's architectures flag them with a vocabulary axis)
VOCAB_TENSORS = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|lm_head|embed_out)\.weight$")
_SETTINGS = ("special", "lstrip", "rstrip", "normalized", "single_word")
# mergekit 0.1.5's `mergekit/_data/chat_templates` names; jmerge ships its own file of each standard format
CHAT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def vocabulary(directory: Path):
    """A model's vocabulary as comparable data: ``tokenizer.json``'s tokens and added tokens,
    else the bytes of ``vocab.json`` / ``tokenizer.model``; None when it has no tokenizer files."""
    tok = directory / "tokenizer.json"
    if tok.is_file():
        data = json.loads(tok.read_text())
        added = sorted((t["id"], t["content"]) for t in data.get("added_tokens", []))
        return data.get("model", {}).get("vocab"), added
    for name in ("vocab.json", "tokenizer.model"):
        if (directory / name).is_file():
            return (directory / name).read_bytes()
    return None


@dataclass(frozen=True)
class Vocab:
    """The output vocabulary (``tokens``: token -> output id) and, per model, the row of its
    own embedding each output id takes (``rows[model][i]``, -1 where it lacks the token)."""

    tokens: dict[str, int]
    rows: dict[Path, np.ndarray]
    base: Path | None  # mergekit's base_model, whose rows fill the tokens other models lack

    @property
    def size(self) -> int:
        return len(self.tokens)

    def remap(self, models: list[Path], arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Each model's ``arrays[k]`` (rows = its token ids) on the output vocabulary (mergekit's
        ``PermutedVocabulary``); ``models`` may repeat a path, which then counts once."""
        unique = list(dict.fromkeys(models))
        perms = {m: self.rows[m] for m in unique}
        gathered = {m: arrays[models.index(m)][np.maximum(perms[m], 0)] for m in unique}
        present = {m: (perms[m] >= 0)[:, None] for m in unique}
        total = np.zeros_like(gathered[unique[0]])
        for m in unique:  # mergekit sums the present rows in the tensors' dtype, model by model
            total = total + np.where(present[m], gathered[m], 0).astype(total.dtype)
        count = sum(present[m].astype(np.int64) for m in unique)
        default = (total / np.maximum(count, 1).astype(total.dtype)).astype(total.dtype)
        if self.base in perms:
            default = np.where(present[self.base], gathered[self.base], default)
        remapped = {m: np.where(present[m], gathered[m], default) for m in unique}
        return [remapped[m] for m in models]


def _tokenizer(directory: Path) -> dict | None:
    path = directory / "tokenizer.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _rows_of(directory: Path) -> int | None:
    path = directory / "config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    size = cfg.get("vocab_size", cfg.get("text_config", {}).get("vocab_size"))
    return size if isinstance(size, int) else None


def _full_vocab(data: dict, model: Path) -> dict[str, int]:
    """``get_vocab()`` of a fast tokenizer: the model's vocabulary and the added tokens."""
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        kind = data.get("model", {}).get("type")
        raise ConfigError(f"{model / 'tokenizer.json'}: tokenizer model {kind!r} has no token -> id vocabulary "
                          "(jmerge remaps WordLevel, WordPiece and BPE tokenizers)")
    return {**vocab, **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}


def build(source: str, key: str, base_model: Path | None, donor: Path, models: list[Path]) -> tuple[dict[str, str], Vocab | None]:
    """``(tokenizer files for the output, the row remapping or None)`` for ``key: source``
    (``base``, ``union`` or a model's path). ``donor`` is the base (or the first model),
    ``models`` every model the config reads; no tensor is read."""
    data = {m: _tokenizer(m) for m in dict.fromkeys([donor, *models])}
    if data[donor] is None:
        if any(vocabulary(m) != vocabulary(donor) for m in models):
            raise ConfigError(f"`{key}: {source}`: {donor} has no tokenizer.json, so the vocabularies of "
                              f"{', '.join(str(m) for m in models if vocabulary(m) != vocabulary(donor))} "
                              "cannot be remapped onto it")
        return ({} if source in ("base", "union") else _files(Path(source))), None
    for m, d in data.items():
        if d is None:
            data[m] = data[donor]  # mergekit: "Unable to load tokenizer ... Assuming same as the base"
    vocabs = {m: _own_vocab(m, d) for m, d in data.items()}
    if source == "base":
        out, files = vocabs[donor], {}
    elif source == "union":  # the union of equal vocabularies is the base's tokenizer
        same = all(v == vocabs[donor] for v in vocabs.values())
        out, files = (vocabs[donor], {}) if same else _union(donor, data, vocabs, key)
    else:
        src = Path(source)
        d = _tokenizer(src)
        if d is None:
            raise ConfigError(f"`{key}: {source}`: {src} has no tokenizer.json")
        out, files = _full_vocab(d, src), _files(src)
    if all(vocabs[m] == out for m in vocabs) and _ids_are_rows(out):
        return files, None  # the identity permutation: the merge is unchanged
    if sorted(out.values()) != list(range(len(out))):
        raise ConfigError(f"`{key}: {source}`: the output vocabulary's ids are not 0..{len(out) - 1}")
    rows = {}
    for m, v in vocabs.items():
        p = np.full(len(out), -1, np.int64)
        for tok, i in out.items():
            p[i] = v.get(tok, -1)
        rows[m] = p
    return files, Vocab(out, rows, base_model)


def _ids_are_rows(vocab: dict[str, int]) -> bool:
    return sorted(vocab.values()) == list(range(len(vocab)))


def _own_vocab(model: Path, data: dict) -> dict[str, int]:
    """A model's tokens with an id below its embedding rows (config.json's ``vocab_size``)."""
    vocab = _full_vocab(data, model)
    rows = _rows_of(model)
    return vocab if rows is None else {t: i for t, i in vocab.items() if i < rows}


def _union(donor: Path, data: dict[Path, dict], vocabs: dict[Path, dict], key: str):
    """mergekit's ``build_union_tokenizer`` with ``tokenizers``: the donor's tokenizer plus
    every other model's tokens (regular, then added ones with their settings)."""
    try:
        from tokenizers import AddedToken, Tokenizer
    except ImportError:
        raise ConfigError(f"`{key}: union` over differing vocabularies needs the `tokenizers` package "
                          "(pip install 'jmerge[hf]')") from None
    added: dict[str, tuple[dict, Path]] = {}
    regular: list[str] = []
    for m, d in data.items():
        own = vocabs[m]
        mine = {t["content"]: t for t in d.get("added_tokens", []) if t["content"] in own}
        regular += [t for t in own if t not in mine]
        for content, t in mine.items():
            if content in added:
                first, where = added[content]
                if any(first.get(s) != t.get(s) for s in _SETTINGS):
                    raise ConfigError(
                        f"`{key}: union`: {where} and {m} add the token {content!r} with different settings "
                        f"({', '.join(f'{s}={first.get(s)}/{t.get(s)}' for s in _SETTINGS if first.get(s) != t.get(s))}); "
                        "give `tokenizer_source` one model's vocabulary instead")
                continue
            added[content] = (t, m)
    tok = Tokenizer.from_str(json.dumps(data[donor]))
    base_vocab = vocabs[donor]
    tok.add_tokens([t for t in dict.fromkeys(regular) if t not in added and t not in base_vocab])
    tok.add_tokens([AddedToken(t["content"], **{s: bool(t.get(s, False)) for s in _SETTINGS}) for t, _ in added.values()])
    text = tok.to_str(pretty=True)
    files = {"tokenizer.json": text + "\n"}
    vocab = tok.get_vocab(with_added_tokens=True)
    cfg_path = donor / "tokenizer_config.json"
    if cfg_path.is_file():  # transformers reads added tokens from tokenizer_config.json too
        cfg = json.loads(cfg_path.read_text())
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {
                str(t["id"]): {s: t[s] for s in ("content", *_SETTINGS) if s in t}
                for t in json.loads(text)["added_tokens"]}
            files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
    return vocab, files


def _files(donor: Path) -> dict[str, str]:
    return {n: (donor / n).read_text() for n in _TEXT_FILES if (donor / n).is_file()}


def chat_template_files(template: str, donor_files: dict[str, str], base: Path, models: list[Path]) -> dict[str, str]:
    """``tokenizer_config.json`` with ``chat_template`` set (``auto``: the most common among the
    models; a name of :data:`CHAT_TEMPLATES`: that format, from ``jmerge/config/chat_templates``)."""
    if template == "auto":
        found = [t.strip() for t in map(_template_of, [base, *models]) if t]
        if not found:
            return {}
        template = Counter(found).most_common(1)[0][0]
    elif template in CHAT_TEMPLATES:
        template = resources.files("jmerge.config").joinpath("chat_templates", template + ".jinja").read_text()
    elif "{" not in template:
        raise ConfigError(f"`chat_template: {template}`: not a Jinja template, `auto` or a built-in name "
                          f"({', '.join(CHAT_TEMPLATES)}){closest(template, CHAT_TEMPLATES)}")
    text = donor_files.get("tokenizer_config.json")
    if text is None:
        text = (base / "tokenizer_config.json").read_text() if (base / "tokenizer_config.json").is_file() else "{}"
    cfg = json.loads(text)
    cfg["chat_template"] = template
    return {"tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"}


def _template_of(directory: Path) -> str | None:
    path = directory / "tokenizer_config.json"
    if path.is_file():
        t = json.loads(path.read_text()).get("chat_template")
        if isinstance(t, str):
            return t
    jinja = directory / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None
