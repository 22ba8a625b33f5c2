"""YAML merge configurations: mergekit's format for the methods both tools have, plus jmerge's own.

A config is validated whole (unknown keys, methods and parameters are named, with the
closest known name) and resolved to a :class:`MergePlan` before any tensor is read::

    models:
      - model: ./math-ft
        parameters: {weight: 1.0, density: 0.2}
      - model: ./code-ft
        parameters: {weight: 0.5, density: 0.2}
    base_model: ./base
    merge_method: ties
    parameters: {lambda: 1.0, normalize: true}
    dtype: float32
    jmerge:                    # jmerge's own keys (all optional)
      trim: global             # the TIES paper's global trim instead of mergekit's per tensor
      seed: 0                  # PRNG seed of DARE / DELLA
      parameters: {sign: count}  # any jmerge hyper-parameter of the method, passed as is
      lwptv: {layers: gpt2, score: trim_survival, rule: keep_ratio, value: 0.8}  # LwPTV (in memory)
      # method: iso_cts        # run this jmerge method instead, global parameters passed as is
      # compute_dtype: model   # mergekit's arithmetic in `dtype`, bit for bit (default float32)
      # in_memory: false       # load whole models instead of streaming
      # check_finite: true     # refuse NaN/inf inputs
      # learn:                 # DivMerge / AdaMerging coefficients for causal LMs (merge_method
      #   prompts: [math.txt, code.jsonl]   # task_arithmetic; one prompt file per model)
      #   method: divmerge       # or adamerging; granularity: task | layer | tensor; layers: gpt2

A parameter mergekit reads for some method but not for this one (e.g. a per-model
``weight`` for ``slerp`` or ``model_stock``) is ignored with a ``ConfigWarning`` naming it, as
mergekit ignores it; any other unknown name is an error (mergekit would silently ignore a
misspelt ``densty``). The ``base_model`` may also be listed among ``models`` (under any
spelling of its path); it is then not merged as an expert, except for ``linear`` and
``karcher``, which average every listed model (``karcher`` the base_model too).

mergekit's ``slices`` (``sources`` with ``layer_range``), ``modules`` (each module of a
multimodal checkpoint, :mod:`.hf_modules`, with its own ``models`` or ``slices``), parameter
gradients and ``filter`` conditionals (:mod:`.settings`) give a per-tensor plan (:mod:`.slices`);
``tokenizer_source``/``tokenizer``/``chat_template``: :mod:`.tokenizer`.

Any other registered jmerge method (``magmax``, ``consensus``, ``tsv``, ``iso_c``,
``iso_cts``...) may be named in ``merge_method`` directly: its global ``parameters`` are
jmerge hyper-parameters and per-model values become per-task tuples (``weight`` ->
``weights``).

The package has one module per job: :mod:`.schema` (the YAML document and its errors),
:mod:`.mergekit` (mapping mergekit's methods from the facts each
:class:`~jmerge.methods.registry.Method` declares in its ``mergekit``; the mapping table), :mod:`.plan`
(resolving a config to a :class:`MergePlan`), :mod:`.settings` (gradients and filters),
:mod:`.hf_layers` (a checkpoint's layer stack; the output config.json), :mod:`.hf_modules` (the modules
of multimodal architectures), :mod:`.slices` (per-tensor jobs) and :mod:`.tokenizer`.
"""

from jmerge.config.mergekit import ConfigWarning
from jmerge.config.plan import MergePlan, plan_from_yaml, resolve
from jmerge.config.schema import ConfigError, LearnOptions, MergeConfig, load_config

__all__ = ["ConfigError", "ConfigWarning", "LearnOptions", "MergeConfig", "MergePlan", "load_config",
           "plan_from_yaml", "resolve"]
