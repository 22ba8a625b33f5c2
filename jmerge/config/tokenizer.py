"""mergekit's ``tokenizer_source`` / ``tokenizer: {source}`` and ``chat_template`` keys.

mergekit 0.1.5 (``tokenizer/build.py``) builds the output vocabulary from the base, from one
model, or as the union of every model's, and permutes each model's embedding rows onto it.
When every referenced model has the same vocabulary (fine-tunes of one base) that permutation
is the identity for every source, so the merge is unchanged and the output takes the source's
tokenizer files; jmerge accepts exactly that case and refuses vocabularies that differ, naming
the models (the row remapping is not implemented).

``chat_template``: a Jinja template (text with ``{``) or ``auto`` (the template most models
carry, as mergekit picks it) is written to the output's ``tokenizer_config.json``; mergekit's
built-in template names are refused.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from jmerge.config.schema import ConfigError

_TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
               "merges.txt", "chat_template.jinja")


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


def source_files(source: str, base: Path, models: list[Path], where: str) -> dict[str, str]:
    """The output's tokenizer files for ``tokenizer_source: source`` (``base``, ``union`` or a
    model's path) when every model's vocabulary equals the base's; a config error otherwise."""
    vocab = vocabulary(base)
    differ = [str(m) for m in models if vocabulary(m) != vocab]
    if differ:
        raise ConfigError(f"`{where}: {source}`: the vocabularies of {', '.join(differ)} differ from the base's "
                          f"({base}); jmerge merges models of one vocabulary (mergekit's embedding-row remapping "
                          "is not implemented)")
    if source in ("base", "union"):
        return {}  # the base's files are the output's (union of equal vocabularies)
    donor = Path(source)
    return {n: (donor / n).read_text() for n in _TEXT_FILES if (donor / n).is_file()}


def chat_template_files(template: str, donor_files: dict[str, str], base: Path, models: list[Path]) -> dict[str, str]:
    """``tokenizer_config.json`` with ``chat_template`` set (``auto``: the most common among the models)."""
    if template == "auto":
        found = [t.strip() for t in map(_template_of, [base, *models]) if t]
        if not found:
            return {}
        template = Counter(found).most_common(1)[0][0]
    elif "{" not in template:
        raise ConfigError(f"`chat_template: {template}`: jmerge takes a Jinja template or `auto`, not mergekit's "
                          "built-in template names")
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
