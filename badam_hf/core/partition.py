"""Cut a model's parameters into BAdam blocks.

The layer stack is found from the module structure (an `nn.ModuleList` of same-class layers), not from
parameter names, so Llama/Mistral/Qwen2 (`model.layers.N`), GPT-2 (`transformer.h.N`) and BERT/RoBERTa
(`encoder.layer.N`) all work, with any head on top. Everything registered before the stack along its
chain of parents (token/position embeddings) is the *input side*; everything else outside the stack
(final norm, LM head, task head) is the *output side*.

Vision-language models (a config with `vision_config` and a language model behind `get_decoder()`: Llava,
Qwen2-VL / 2.5-VL / 3-VL, Gemma 3) are partitioned by their language model's layers; the vision tower and the
projector / merger between it and the language model stay frozen unless `include_vision` (the vision layers
become blocks too, after the language ones) or `include_projector` (the projector trains in every block).

Every stack (also an encoder-decoder's two, and a VLM's vision stack) records which parameters run before it
(`StackInfo.upstream`), so backward truncation can cut each stack at its lowest active layer whenever nothing
trainable runs before that stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .config import PartitionConfig
from .errors import BAdamConfigError

# Randomly initialised task heads that should keep training whatever block is active.
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")
_ATTENTION_CHILD = re.compile(r"attn|attention", re.IGNORECASE)
_NORM_CHILD = re.compile(r"norm", re.IGNORECASE)


@dataclass
class Block:
    name: str
    param_names: list[str]


@dataclass
class LayerStack:
    path: str  # module path of the ModuleList, e.g. "model.layers"
    layers: list[nn.Module]


@dataclass
class StackInfo:
    """A layer stack as backward truncation sees it."""

    stack: LayerStack
    layer_of: dict[str, int]  # parameter name -> layer index in this stack
    upstream: set[str]  # parameters that run before this stack (registered before it along its parents)


@dataclass
class Multimodal:
    """Where a vision-language model's parts are (parameter names), found by `find_multimodal`."""

    language: str  # module path of the language model, e.g. "model.language_model"
    language_stack: LayerStack
    vision: list[str]  # the vision tower's parameters (frozen unless include_vision adds its layers)
    projector: list[str]  # the projector / merger(s) (frozen unless include_projector)
    vision_stacks: list[LayerStack]
    unused_layers: list[str] = field(default_factory=list)  # vision layer paths whose output is never read


@dataclass
class Partition:
    """The blocks of one model, plus what the optimizer needs to know about where they sit."""

    blocks: list[Block]
    always_active: list[str]  # parameter names trained in every block
    stacks: list[LayerStack]
    input_side: set[str] = field(default_factory=set)  # parameter names that run before the stack
    layer_of: dict[str, int] = field(default_factory=dict)  # parameter name -> layer index in the stack
    chain: list[StackInfo] = field(default_factory=list)  # every layer stack, in the order they run
    multimodal: Multimodal | None = None  # a vision-language model's parts

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def lowest_layer(self, param_names) -> int | None:
        """Index of the lowest stack layer holding one of `param_names` (None: none is in the stack)."""
        idx = [self.layer_of[n] for n in param_names if n in self.layer_of]
        return min(idx) if idx else None


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by name; a tied parameter appears once, under the first name it was registered with."""
    return dict(model.named_parameters())


def find_layer_stacks(model: nn.Module) -> list[LayerStack]:
    """The repeated-layer stacks: ModuleLists of same-class modules holding parameters, not nested in one
    another, and holding at least a tenth of the parameters of the largest such list (this skips small
    lists such as a few adapters while keeping both stacks of an encoder-decoder)."""
    return _largest(_stack_candidates(model))


def _largest(candidates) -> list[LayerStack]:
    if not candidates:
        return []
    largest = max(c[2] for c in candidates)
    return [LayerStack(path, list(module)) for path, module, numel in candidates if numel * 10 >= largest]


def _stack_candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList, int]]:
    """(path, ModuleList, numel) of every outermost ModuleList of same-class modules holding parameters."""
    candidates = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        # ZeRO-3 partitioned parameters are empty here; `ds_numel` keeps their real size.
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
        if numel == 0:
            continue
        candidates.append((path, module, numel))
    return [c for c in candidates if not any(c[0].startswith(o[0] + ".") for o in candidates if o is not c)]


# Modules between a vision tower and the language model (Llava / Gemma 3: multi_modal_projector; Qwen-VL:
# visual.merger, and Qwen3-VL's DeepStack mergers; others: mm_projector, connector).
PROJECTOR_NAMES = ("multi_modal_projector", "merger", "deepstack_merger_list", "mm_projector", "connector")


def find_multimodal(model: nn.Module) -> Multimodal | None:
    """A vision-language model's language model, vision tower and projector; None for other models.

    The language model is `model.get_decoder()`; the vision side is everything outside it but the LM head
    (the modules beside it along its chain of parents); the projector is the part of the vision side named
    like one (`PROJECTOR_NAMES`), the rest is the vision tower."""
    if getattr(getattr(model, "config", None), "vision_config", None) is None:
        return None
    get = getattr(model, "get_decoder", None)
    language = get() if callable(get) else None
    if not isinstance(language, nn.Module) or language is model:
        return None
    lpath = next((p for p, m in model.named_modules() if m is language), None)
    candidates = _stack_candidates(model)
    in_language = [c for c in candidates if _under(c[0], lpath)] if lpath else []
    if not in_language:
        return None
    path, module, _ = max(in_language, key=lambda c: c[2])
    lstack = LayerStack(path, list(module))
    names = list(named_parameters(model))
    side = _siblings_along(model, lpath)
    side_names = [n for n in names if any(_under(n, m) for m in side)]
    projectors = [p for p, _ in model.named_modules() if p.split(".")[-1] in PROJECTOR_NAMES
                  and any(_under(p, m) for m in side)]
    projectors = [p for p in projectors if not any(_under(p, q) and p != q for q in projectors)]
    projector = [n for n in side_names if any(_under(n, p) for p in projectors)]
    vision = [n for n in side_names if n not in set(projector)]
    vision_stacks = _largest([
        c for c in candidates
        if any(_under(c[0], m) for m in side) and not any(_under(c[0], p) for p in projectors)
    ])
    return Multimodal(lpath, lstack, vision, projector, vision_stacks,
                      _unused_vision_layers(model.config, vision_stacks))


def _siblings_along(model: nn.Module, path: str) -> list[str]:
    """The modules beside `path` at each level of its chain of parents, except the output embedding (LM head):
    in a VLM, the vision tower and projector, wherever they are registered."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    out, module, prefix = [], model, ""
    for part in path.split("."):
        out += [prefix + name for name, child in module.named_children() if name != part and child is not head]
        module, prefix = getattr(module, part), prefix + part + "."
    return out


def _unused_vision_layers(config, vision_stacks: list[LayerStack]) -> list[str]:
    """Vision layers above the hidden state the model reads (`vision_feature_layer(s)`: Llava's -2 reads the
    second-to-last CLIP layer's output, so the last layer runs but never reaches the loss)."""
    read = getattr(config, "vision_feature_layer", getattr(config, "vision_feature_layers", None))
    if read is None or len(vision_stacks) != 1:
        return []
    read = [read] if isinstance(read, int) else list(read)
    n = len(vision_stacks[0].layers)
    # hidden_states[j] is the output of the first j layers (hidden_states[0]: the embeddings).
    used = max(j if j >= 0 else n + 1 + j for j in read)
    return [f"{vision_stacks[0].path}.{i}" for i in range(used, n)]


def _input_side_modules(model: nn.Module, stack_path: str) -> list[str]:
    """Module paths registered before the stack at each level of its chain of parents."""
    out = []
    parts = stack_path.split(".")
    module, prefix = model, ""
    for part in parts:
        for name, _child in module.named_children():
            if name == part:
                break
            out.append(prefix + name)
        module = getattr(module, part)
        prefix = prefix + part + "."
    return out


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _layer_blocks(stack: LayerStack, model: nn.Module, granularity: str, names_of: dict[int, str]) -> list[Block]:
    blocks = []
    for i, layer in enumerate(stack.layers):
        lpath = f"{stack.path}.{i}"
        own = [names_of[id(p)] for p in layer.parameters() if id(p) in names_of]
        if granularity == "layer":
            blocks.append(Block(lpath, own))
        elif granularity == "attn_mlp":
            # Skip norms named after attention (Llama's `post_attention_layernorm` is the MLP's pre-norm).
            attn = [c for c, _ in layer.named_children() if _ATTENTION_CHILD.search(c) and not _NORM_CHILD.search(c)]
            attn_names = [n for n in own if any(_under(n, f"{lpath}.{c}") for c in attn)]
            rest = [n for n in own if n not in set(attn_names)]
            if attn_names:
                blocks.append(Block(f"{lpath}.attn", attn_names))
            if rest:
                blocks.append(Block(f"{lpath}.mlp" if attn_names else lpath, rest))
        else:  # matrix: each module owning a >=2-D weight (with its bias); leftover 1-D params per layer
            taken: set[str] = set()
            for mpath, mod in layer.named_modules():
                direct = [(pn, p) for pn, p in mod.named_parameters(recurse=False) if id(p) in names_of]
                if any(p.dim() >= 2 for _, p in direct):
                    full = [names_of[id(p)] for _, p in direct]
                    full = [n for n in full if n not in taken]
                    if full:
                        blocks.append(Block(f"{lpath}.{mpath}", full))
                        taken.update(full)
            rest = [n for n in own if n not in taken]
            if rest:
                blocks.append(Block(f"{lpath}.norms", rest))
    return blocks


def _match_entry(entry: str, names: list[str]) -> list[str]:
    hits = [n for n in names if _under(n, entry)]
    if hits:
        return hits
    try:
        pattern = re.compile(entry)
    except re.error as e:
        raise BAdamConfigError(f"target module {entry!r} is neither a parameter prefix nor a valid regex: {e}.")
    return [n for n in names if pattern.fullmatch(n)]


def partition_model(model: nn.Module, config: PartitionConfig | None = None,
                    outside_blocks_active: bool = False) -> Partition:
    """Split `model`'s parameters into blocks according to `config` (see `PartitionConfig`).
    `outside_blocks_active` (mode lisa): with `always_active` unset, everything outside the blocks (the
    embeddings, final norm and LM head of a decoder; the pooler and task head of an encoder) trains always;
    a vision-language model's vision tower and projector stay frozen all the same."""
    config = config or PartitionConfig()
    params = named_parameters(model)
    names = list(params)
    names_of = {id(p): n for n, p in params.items()}
    mm = find_multimodal(model)
    if mm is None and (config.include_vision or config.include_projector):
        key = "include_vision" if config.include_vision else "include_projector"
        raise BAdamConfigError(
            f"{key}=true but {type(model).__name__} is not a vision-language model (one whose config has a "
            "vision_config and whose language model get_decoder() returns); leave it unset."
        )
    if mm is not None:
        # The language layers are the blocks (the layer_of / input_side stack); vision layers only on request.
        stacks = [mm.language_stack] + (mm.vision_stacks if config.include_vision else [])
        all_stacks = mm.vision_stacks + [mm.language_stack]  # in the order they run
        frozen = set(mm.vision) | set(mm.projector)  # never trained unless asked for
    else:
        stacks = all_stacks = find_layer_stacks(model)
        frozen = set()

    layer_of: dict[str, int] = {}
    input_side: set[str] = set()
    chain = [_stack_info(model, s, names, names_of) for s in all_stacks]
    if mm is not None:  # the vision side feeds the language model wherever it is registered
        chain[-1].upstream |= frozen
    if len(stacks) == 1 or mm is not None:
        primary = next(i for i in chain if i.stack.path == stacks[0].path)
        layer_of, input_side = dict(primary.layer_of), set(primary.upstream)
    in_stack = {n for s in all_stacks for n in names if _under(n, s.path)}

    if config.target_modules is not None:
        blocks = []
        for entry in config.target_modules:
            hits = _match_entry(entry, names)
            if not hits:
                sample = ", ".join(names[:3])
                raise BAdamConfigError(
                    f"target module {entry!r} matches no parameter; entries are parameter-name prefixes "
                    f"(e.g. {sample}) or regular expressions matched against whole parameter names."
                )
            blocks.append(Block(entry, hits))
    else:
        if not stacks:
            raise BAdamConfigError(
                f"found no stack of repeated layers (an nn.ModuleList of same-class modules) in "
                f"{type(model).__name__}; name the blocks yourself with optim_target_modules / target_modules, "
                "e.g. ['encoder.blocks.0', 'encoder.blocks.1']."
            )
        blocks = [b for s in stacks for b in _layer_blocks(s, model, config.granularity, names_of)]
        if mm is not None and mm.unused_layers:
            blocks = [b for b in blocks if not any(_under(b.name, u) for u in mm.unused_layers)]
        if config.include_embedding:
            emb = [n for n in names if n in input_side and n not in frozen]
            if not emb:
                raise BAdamConfigError("include_embedding=true but the model has no parameters before its layer stack.")
            blocks.insert(0, Block("embedding", emb))

    # Always-active modules: explicit prefixes, or the task head found by name.
    if config.always_active is None and outside_blocks_active:
        in_any = {n for b in blocks for n in b.param_names}
        always_prefixes = [n for n in names if n not in in_any and n not in frozen]
    elif config.always_active is None:
        always_prefixes = [
            mpath for mpath, _ in model.named_modules()
            if mpath.split(".")[-1] in TASK_HEAD_NAMES and not any(_under(mpath, s.path) for s in all_stacks)
        ]
        always_prefixes = [p for p in always_prefixes if not any(_under(p, q) and p != q for q in always_prefixes)]
    else:
        always_prefixes = config.always_active
    always: list[str] = []
    # A head picked by default yields to blocks the user named explicitly (target_modules=[..., "classifier"]).
    in_blocks = {n for b in blocks for n in b.param_names} if config.always_active is None else set()
    for prefix in always_prefixes:
        hits = [n for n in names if _under(n, prefix) and n not in in_blocks]
        if not hits and config.always_active is None:
            continue
        if not hits:
            raise BAdamConfigError(f"always_active entry {prefix!r} matches no parameter of {type(model).__name__}.")
        always.extend(h for h in hits if h not in always)
    if config.include_projector:
        if not mm.projector:
            raise BAdamConfigError(
                f"include_projector=true but no projector was found in {type(model).__name__} (looked for modules "
                f"named {', '.join(PROJECTOR_NAMES)} between the vision tower and the language model); name it "
                "in always_active instead."
            )
        always.extend(n for n in mm.projector if n not in always)

    if config.target_modules is None and config.include_lm_head:
        # Output side; a tied LM head lives under the input embedding's name, so claim it here unless the
        # embedding block already has it.
        head = [
            n for n in names
            if n not in in_stack and n not in always and n not in frozen
            and (n not in input_side or (not config.include_embedding and _is_output_embedding(model, params[n])))
        ]
        if not head:
            raise BAdamConfigError("include_lm_head=true but the model has no parameters after its layer stack.")
        blocks.append(Block("lm_head", head))

    # A parameter may belong to one block only, and always-active parameters to none.
    owner: dict[str, str] = {}
    for b in blocks:
        for n in b.param_names:
            if n in owner:
                raise BAdamConfigError(f"parameter {n!r} is in two blocks: {owner[n]!r} and {b.name!r}.")
            owner[n] = b.name
    clash = [n for n in always if n in owner]
    if clash:
        raise BAdamConfigError(
            f"always_active parameter {clash[0]!r} is also in block {owner[clash[0]]!r}; a parameter is either "
            "always active or in one block."
        )
    empty = [b.name for b in blocks if not b.param_names]
    if empty:
        raise BAdamConfigError(f"block(s) {empty} have no parameters.")
    return Partition(blocks=blocks, always_active=always, stacks=stacks, input_side=input_side, layer_of=layer_of,
                     chain=chain, multimodal=mm)


def _stack_info(model: nn.Module, stack: LayerStack, names: list[str], names_of: dict[int, str]) -> StackInfo:
    layer_of: dict[str, int] = {}
    for i, layer in enumerate(stack.layers):
        for p in layer.parameters():
            if id(p) in names_of:
                layer_of.setdefault(names_of[id(p)], i)
    before = _input_side_modules(model, stack.path)
    return StackInfo(stack, layer_of, {n for n in names if any(_under(n, m) for m in before)})


def _is_output_embedding(model: nn.Module, param: nn.Parameter) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return out is not None and any(p is param for p in out.parameters())
