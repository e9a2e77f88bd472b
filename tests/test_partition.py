"""partition_model on tiny Llama / Qwen2 / GPT-2 / RoBERTa models: blocks, extra blocks, task heads, errors."""

import re

import pytest
import torch
from torch import nn

from badam_hf.core.config import BAdamConfigError, PartitionConfig
from badam_hf.core.partition import partition_model

L = 3  # layers in every tiny model

STACK = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "gpt2": "transformer.h",
    "roberta_cls": "roberta.encoder.layer",
    "roberta_mc": "roberta.encoder.layer",
    "llama_cls": "model.layers",
}
HEAD = {"roberta_cls": "classifier", "roberta_mc": "classifier", "llama_cls": "score"}
KINDS = list(STACK)


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_qwen2, tiny_gpt2, tiny_roberta):
    """One model of each kind, built in this order from one seed (seed=None: the builders do not reseed)."""
    torch.manual_seed(0)
    built = {}
    built["llama"] = tiny_llama(layers=L, seed=None)
    built["qwen2"] = tiny_qwen2(layers=L, seed=None, max_positions=None)
    built["gpt2"] = tiny_gpt2(layers=L, seed=None, max_positions=32, dropout=None, bos_token_id=0, eos_token_id=0)
    roberta = dict(layers=L, seed=None, type_vocab=None, dropout=None)
    built["roberta_cls"] = tiny_roberta(**roberta, num_labels=3)
    built["roberta_mc"] = tiny_roberta(**roberta, head="multiple_choice")
    built["llama_cls"] = tiny_llama(layers=L, seed=None, head="classification", num_labels=2, pad_token_id=0)
    assert list(built) == KINDS
    return built


def names(model):
    return [n for n, _ in model.named_parameters()]


def check_disjoint(part, model):
    """Every parameter in at most one block, none both in a block and always active; all names real."""
    all_names = set(names(model))
    seen = []
    for b in part.blocks:
        assert b.param_names, b.name
        seen.extend(b.param_names)
    assert len(seen) == len(set(seen)), "a parameter is in two blocks"
    assert set(seen) <= all_names
    assert not set(seen) & set(part.always_active)
    assert set(part.always_active) <= all_names
    return set(seen)


# --- granularity=layer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_layer_granularity(models, kind):
    model = models[kind]
    part = partition_model(model)
    stack = STACK[kind]
    assert len(part) == L
    assert part.names == [f"{stack}.{i}" for i in range(L)]
    for i, b in enumerate(part.blocks):
        assert b.param_names == [n for n in names(model) if n.startswith(f"{stack}.{i}.")]
    in_blocks = check_disjoint(part, model)
    # Outside the layer stack: in no block (embeddings, final norm, heads) without the include flags.
    outside = [n for n in names(model) if not n.startswith(stack + ".")]
    assert outside and not in_blocks & set(outside)
    assert in_blocks == {n for n in names(model) if n.startswith(stack + ".")}
    assert [s.path for s in part.stacks] == [stack]
    assert all(part.layer_of[n] == int(n[len(stack) + 1:].split(".")[0]) for n in in_blocks)
    assert part.lowest_layer(part.blocks[2].param_names + part.blocks[1].param_names) == 1
    assert part.lowest_layer(outside) is None


def test_input_side(models):
    assert partition_model(models["llama"]).input_side == {"model.embed_tokens.weight"}
    assert partition_model(models["gpt2"]).input_side == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert partition_model(models["roberta_mc"]).input_side == {
        n for n in names(models["roberta_mc"]) if n.startswith("roberta.embeddings.")
    }


# --- granularity=attn_mlp -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, attn_child", [("llama", "self_attn"), ("qwen2", "self_attn"), ("gpt2", "attn"),
                                              ("roberta_cls", "attention")])
def test_attn_mlp_granularity(models, kind, attn_child):
    model = models[kind]
    stack = STACK[kind]
    part = partition_model(model, PartitionConfig(granularity="attn_mlp"))
    assert len(part) == 2 * L
    check_disjoint(part, model)
    for i in range(L):
        attn, rest = part.blocks[2 * i], part.blocks[2 * i + 1]
        assert (attn.name, rest.name) == (f"{stack}.{i}.attn", f"{stack}.{i}.mlp")
        layer = [n for n in names(model) if n.startswith(f"{stack}.{i}.")]
        assert attn.param_names == [n for n in layer if n.startswith(f"{stack}.{i}.{attn_child}.")]
        assert rest.param_names == [n for n in layer if n not in attn.param_names]
    if kind == "llama":
        # Llama's post_attention_layernorm is the MLP's pre-norm, not an attention parameter.
        assert "model.layers.0.post_attention_layernorm.weight" in part.blocks[1].param_names


# --- granularity=matrix -------------------------------------------------------------------------------------


def test_matrix_granularity_llama(models):
    model = models["llama"]
    part = partition_model(model, PartitionConfig(granularity="matrix"))
    mats = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert len(part) == L * (len(mats) + 1)  # 7 matrices + one block of the two RMSNorm weights per layer
    expected = []
    for i in range(L):
        expected += [(f"model.layers.{i}.{m}", [f"model.layers.{i}.{m}.weight"]) for m in mats]
        expected.append((f"model.layers.{i}.norms", [f"model.layers.{i}.input_layernorm.weight",
                                                     f"model.layers.{i}.post_attention_layernorm.weight"]))
    assert [(b.name, b.param_names) for b in part.blocks] == expected
    check_disjoint(part, model)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2", "roberta_cls"])
def test_matrix_granularity_bias_with_weight(models, kind):
    model = models[kind]
    params = dict(model.named_parameters())
    stack = STACK[kind]
    part = partition_model(model, PartitionConfig(granularity="matrix"))
    in_blocks = check_disjoint(part, model)
    assert in_blocks == {n for n in params if n.startswith(stack + ".")}
    for b in part.blocks:
        if b.name.endswith(".norms"):
            assert all(params[n].dim() == 1 for n in b.param_names)
        else:
            # One module: its >=2-D weight plus, when it has one, its bias.
            assert [n.rsplit(".", 1)[0] for n in b.param_names] == [b.name] * len(b.param_names)
            assert sum(params[n].dim() >= 2 for n in b.param_names) == 1
            assert {n.rsplit(".", 1)[1] for n in b.param_names} <= {"weight", "bias"}
    n_matrices = sum(p.dim() >= 2 for n, p in params.items() if n.startswith(stack + "."))
    assert len(part) == n_matrices + L
    if kind == "qwen2":
        q = part.blocks[0]
        assert q.param_names == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"]


# --- include_embedding / include_lm_head ---------------------------------------------------------------------


def test_include_flags_llama(models):
    model = models["llama"]
    part = partition_model(model, PartitionConfig(include_embedding=True, include_lm_head=True))
    assert len(part) == L + 2
    assert part.blocks[0].name == "embedding" and part.blocks[0].param_names == ["model.embed_tokens.weight"]
    assert part.blocks[-1].name == "lm_head"
    assert part.blocks[-1].param_names == ["model.norm.weight", "lm_head.weight"]
    assert check_disjoint(part, model) == set(names(model))  # every parameter trains in some block

    emb_only = partition_model(model, PartitionConfig(include_embedding=True))
    assert emb_only.names == ["embedding"] + [f"model.layers.{i}" for i in range(L)]
    head_only = partition_model(model, PartitionConfig(include_lm_head=True))
    assert head_only.names == [f"model.layers.{i}" for i in range(L)] + ["lm_head"]
    assert head_only.blocks[-1].param_names == ["model.norm.weight", "lm_head.weight"]


def test_include_flags_gpt2_tied_head(models):
    model = models["gpt2"]
    # The LM head is tied to wte: one Parameter, listed once, under wte's name.
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in names(model)

    both = partition_model(model, PartitionConfig(include_embedding=True, include_lm_head=True))
    assert both.blocks[0].param_names == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert both.blocks[-1].param_names == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert check_disjoint(both, model) == set(names(model))

    head = partition_model(model, PartitionConfig(include_lm_head=True))
    assert len(head) == L + 1
    # Without an embedding block the tied head weight is trained with the output side, once.
    assert head.blocks[-1].param_names == ["transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert check_disjoint(head, model) == set(names(model)) - {"transformer.wpe.weight"}

    emb = partition_model(model, PartitionConfig(include_embedding=True))
    assert emb.blocks[0].param_names == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert len(emb) == L + 1


def test_include_lm_head_tied_qwen2(tiny_qwen2):
    model = tiny_qwen2(layers=2, max_positions=None, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    head = partition_model(model, PartitionConfig(include_lm_head=True))
    assert head.blocks[-1].param_names == ["model.embed_tokens.weight", "model.norm.weight"]
    both = partition_model(model, PartitionConfig(include_embedding=True, include_lm_head=True))
    assert both.blocks[0].param_names == ["model.embed_tokens.weight"]
    assert both.blocks[-1].param_names == ["model.norm.weight"]
    check_disjoint(both, model)


def test_include_lm_head_with_task_head(models):
    # The always-active task head is not claimed by the lm_head block.
    part = partition_model(models["roberta_mc"], PartitionConfig(include_lm_head=True))
    assert part.blocks[-1].param_names == ["roberta.pooler.dense.weight", "roberta.pooler.dense.bias"]
    assert part.always_active == ["classifier.weight", "classifier.bias"]
    part = partition_model(models["llama_cls"], PartitionConfig(include_lm_head=True))
    assert part.blocks[-1].param_names == ["model.norm.weight"]
    assert part.always_active == ["score.weight"]
    # Nothing left after the stack: a clear error rather than an empty block.
    with pytest.raises(BAdamConfigError, match="include_lm_head=true but the model has no parameters after"):
        partition_model(models["roberta_cls"], PartitionConfig(include_lm_head=True))


# --- always_active ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_always_active_default(models, kind):
    model = models[kind]
    part = partition_model(model)
    if kind in HEAD:
        assert part.always_active == [n for n in names(model) if n.startswith(HEAD[kind] + ".")]
        assert part.always_active
    else:
        assert part.always_active == []  # causal LMs: no randomly initialised head
    assert partition_model(model, PartitionConfig(always_active=[])).always_active == []


def test_always_active_explicit(models):
    model = models["roberta_mc"]
    part = partition_model(model, PartitionConfig(always_active=["roberta.pooler", "classifier"]))
    assert part.always_active == ["roberta.pooler.dense.weight", "roberta.pooler.dense.bias",
                                  "classifier.weight", "classifier.bias"]
    part = partition_model(models["llama"], PartitionConfig(always_active=["lm_head", "model.norm"]))
    assert part.always_active == ["lm_head.weight", "model.norm.weight"]
    check_disjoint(part, models["llama"])
    with pytest.raises(BAdamConfigError, match="always_active entry 'pooler' matches no parameter"):
        partition_model(model, PartitionConfig(always_active=["pooler"]))  # a prefix, not a substring


def test_always_active_overlapping_block(models):
    with pytest.raises(BAdamConfigError, match=r"always_active parameter 'model\.layers\.1\..*' is also in block "
                                               r"'model\.layers\.1'"):
        partition_model(models["llama"], PartitionConfig(always_active=["model.layers.1"]))
    with pytest.raises(BAdamConfigError, match="is also in block 'embedding'"):
        partition_model(models["llama"], PartitionConfig(always_active=["model.embed_tokens"], include_embedding=True))


def test_default_head_yields_to_explicit_block(models):
    # target_modules naming the head: the default always-active pick steps aside instead of clashing.
    model = models["roberta_cls"]
    part = partition_model(model, PartitionConfig(target_modules=["roberta.encoder.layer.0", "classifier"]))
    assert part.names == ["roberta.encoder.layer.0", "classifier"]
    assert part.always_active == []
    part = partition_model(model, PartitionConfig(target_modules=[r"classifier\.dense\..*"]))
    assert part.always_active == ["classifier.out_proj.weight", "classifier.out_proj.bias"]
    with pytest.raises(BAdamConfigError, match="is also in block 'classifier'"):
        partition_model(model, PartitionConfig(target_modules=["classifier"], always_active=["classifier"]))


# --- target_modules ------------------------------------------------------------------------------------------


def test_target_modules_prefixes_and_regexes(models):
    model = models["llama"]
    all_names = names(model)
    cfg = PartitionConfig(target_modules=[
        "model.layers.0",
        r"model\.layers\.[12]\.self_attn\..*",
        r"model\.layers\.[12]\.mlp\..*",
        "model.embed_tokens",
        "lm_head",
    ])
    part = partition_model(model, cfg)
    assert part.names == cfg.target_modules
    assert part.blocks[0].param_names == [n for n in all_names if n.startswith("model.layers.0.")]
    assert part.blocks[1].param_names == [n for n in all_names if re.fullmatch(r"model\.layers\.[12]\.self_attn\..*", n)]
    assert len(part.blocks[1].param_names) == 8
    assert part.blocks[2].param_names == [n for n in all_names if re.fullmatch(r"model\.layers\.[12]\.mlp\..*", n)]
    assert part.blocks[3].param_names == ["model.embed_tokens.weight"]
    assert part.blocks[4].param_names == ["lm_head.weight"]
    check_disjoint(part, model)
    # Layer bookkeeping is kept for backward truncation.
    assert part.lowest_layer(part.blocks[1].param_names) == 1
    # A prefix stops at a dot: model.layers.1 is not model.layers.10.
    part = partition_model(model, PartitionConfig(target_modules=["model.layers.1"]))
    assert part.blocks[0].param_names == [n for n in all_names if n.startswith("model.layers.1.")]


def test_target_modules_errors(models):
    model = models["llama"]
    with pytest.raises(BAdamConfigError, match=r"target module 'model\.layers\.7' matches no parameter"):
        partition_model(model, PartitionConfig(target_modules=["model.layers.0", "model.layers.7"]))
    with pytest.raises(BAdamConfigError, match=r"target module 'layers\.0' matches no parameter"):
        partition_model(model, PartitionConfig(target_modules=["layers.0"]))  # regexes match whole names
    with pytest.raises(BAdamConfigError, match=r"neither a parameter prefix nor a valid regex"):
        partition_model(model, PartitionConfig(target_modules=["model.layers.["]))
    with pytest.raises(BAdamConfigError, match=r"parameter 'model\.layers\.0\.mlp\.gate_proj\.weight' is in two "
                                               r"blocks: 'model\.layers\.0' and '.*mlp.*'"):
        partition_model(model, PartitionConfig(target_modules=["model.layers.0", r".*\.mlp\..*"]))


def test_no_layer_stack():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 2))
    with pytest.raises(BAdamConfigError, match=r"found no stack of repeated layers .* in Sequential; .*"
                                               r"optim_target_modules"):
        partition_model(model)
    # Naming the blocks works.
    part = partition_model(model, PartitionConfig(target_modules=["0", "2", r"3\..*"]))
    assert [b.param_names for b in part.blocks] == [["0.weight", "0.bias"], ["2.weight", "2.bias"],
                                                    ["3.weight", "3.bias"]]
    assert part.stacks == [] and part.layer_of == {} and part.always_active == []


def test_include_embedding_without_input_side():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.head = nn.Linear(4, 2)

    part = partition_model(Net())
    assert part.names == ["layers.0", "layers.1"]
    with pytest.raises(BAdamConfigError, match="include_embedding=true but the model has no parameters before"):
        partition_model(Net(), PartitionConfig(include_embedding=True))
    assert partition_model(Net(), PartitionConfig(include_lm_head=True)).blocks[-1].param_names == [
        "head.weight", "head.bias"]


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_qwen3_and_gemma3_text_models_train_in_layer_ratio_and_lisa_modes(family):
    """LLaMA-Factory #8927 reports Qwen3 and Gemma 3 failing in ratio mode: both train here in every mode, with
    only the blocks (and, for lisa, the outside) changing."""
    import transformers as T

    from badam_hf import BlockOptimizer

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    if family == "qwen3":
        model = T.Qwen3ForCausalLM(T.Qwen3Config(**text))
    else:
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**text, query_pre_attn_scalar=8, sliding_window=8))
    ids = torch.randint(2, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    for mode, extra in (("layer", {}), ("ratio", {"update_ratio": 0.25}), ("lisa", {"lisa_layers": 1})):
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = BlockOptimizer(model, mode=mode, switch_every=1, lr=1e-2, **extra)
        assert opt.partition.names == [f"model.layers.{i}" for i in range(L)]
        for _ in range(2 * L):
            trained = {n for b in opt.active_blocks for n in opt.partition.blocks[b].param_names}
            trained |= set(opt.partition.always_active)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
            assert moved and moved <= trained, mode
        assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters())
        opt.truncation.remove()
