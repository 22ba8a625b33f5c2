"""Output directories (jmerge.io.hf_dir): atomic, never over an existing output or an input
unasked, OS errors in words; the model files and card of a merged HF directory."""

import errno
import re

import pytest

from jmerge.io import hf_dir

from helpers import leftovers


def test_atomic_dir_refuses_existing_and_replaces_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(hf_dir.OutputError, match="already exists"):
        with hf_dir.atomic_dir(out):
            pass
    assert (out / "old.txt").read_text() == "old"
    with hf_dir.atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # the old output stays until the new one is complete
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path, "out") == []


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with hf_dir.atomic_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_unwritable_parent(tmp_path):
    """A parent path the OS refuses (here through a regular file, which root cannot write into
    either; permission errors: test_permission_denied_is_reported)."""
    (tmp_path / "file").write_text("x")
    parent = tmp_path / "file" / "sub"
    with pytest.raises(hf_dir.OutputError, match=re.escape(f"error writing {parent}: [Errno 20] Not a directory: '{parent}'")):
        with hf_dir.atomic_dir(parent / "out"):
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_output_may_not_be_an_input(tmp_path):
    (tmp_path / "base").mkdir()
    for out in (tmp_path / "base", tmp_path / "base" / "sub", tmp_path):
        with pytest.raises(hf_dir.OutputError, match="input"):
            with hf_dir.atomic_dir(out, force=True, protect=[tmp_path / "base"]):
                pass
    assert (tmp_path / "base").is_dir()


def test_copy_model_files_and_card(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (src / f).write_text("{}")
    (src / "model.safetensors").write_bytes(b"w")
    (src / "README.md").write_text("upstream card")
    (tmp_path / "dst").mkdir()
    copied = hf_dir.copy_model_files(src, tmp_path / "dst")
    assert sorted(copied) == ["config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    card = hf_dir.model_card(method="ties", base="b", experts=["e1", "e2"], config_text="merge_method: ties\n", version="9.9")
    assert "```yaml\nmerge_method: ties\n```" in card and "9.9" in card and "- `e2`" in card


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(hf_dir.tempfile, "mkdtemp", denied)
    with pytest.raises(hf_dir.OutputError, match="cannot write to .*Permission denied"):
        with hf_dir.atomic_dir(tmp_path / "out"):
            pass
    assert not (tmp_path / "out").exists()



def test_refuse_existing_names_the_output_and_allows_force(tmp_path):
    out = tmp_path / "merged.gguf"
    hf_dir.refuse_existing(out, force=False)  # absent: fine
    out.write_bytes(b"mine")
    with pytest.raises(hf_dir.OutputError, match=re.escape(f"output {out} already exists; pass --force to replace it")):
        hf_dir.refuse_existing(out, force=False, how="pass --force")
    hf_dir.refuse_existing(out, force=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(hf_dir.OutputError, match="dangling already exists"):
        hf_dir.refuse_existing(tmp_path / "dangling", force=False)
    assert out.read_bytes() == b"mine"
