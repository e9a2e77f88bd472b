"""The package's layers: no import cycles, an engine-free core, engines plugged in through the optimizer's
extension points (handles that can be removed), torch's state-dict hooks honoured, and one error family."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import badam_hf
from badam_hf import BAdamConfigError, BAdamError, BlockOptimizer, CheckpointMismatchError, DistributedSetupError
from badam_hf.core import RecipeError

PKG = Path(badam_hf.__file__).resolve().parent

# Which packages each layer may import (besides itself). The root modules (badam_hf/__init__.py and the thin
# re-exports at documented paths) may import anything.
ALLOWED = {
    "core": set(),
    "engines": {"core"},
    "integrations": {"core", "engines"},
    "data": set(),
    "recipes": {"core", "engines", "integrations", "data"},
    "tools": {"core", "engines", "integrations", "data", "recipes", ""},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PKG.parent / rel).with_suffix(".py").is_file() or (PKG.parent / rel / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """badam_hf module -> the badam_hf modules it imports (at any depth, inside functions too)."""
    graph = {}
    for path in sorted(PKG.rglob("*.py")):
        me = module_name(path)
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = me.split(".") if is_pkg else me.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from pkg import sub` imports the submodule when there is one
                subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
                targets = subs if len(subs) == len(node.names) else [mod, *subs]
            for t in targets:
                if t == "badam_hf" or t.startswith("badam_hf."):
                    while not _is_module(t):
                        t = t.rsplit(".", 1)[0]
                    if t != me:
                        edges.add(t)
        graph[me] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 20 and "badam_hf.core.optimizer" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["badam_hf.core.config"] = graph["badam_hf.core.config"] | {"badam_hf.core.optimizer"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "badam_hf.core.optimizer" in cycle


def test_each_layer_imports_only_the_layers_below_it():
    problems = []
    for module, edges in import_graph().items():
        mine = layer(module)
        if mine == "":
            continue  # the package root and the documented re-export paths
        for target in edges:
            theirs = layer(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                problems.append(f"{module} imports {target}")
    assert not problems, "\n".join(sorted(problems))


def test_the_core_imports_nothing_outside_itself():
    outside = {m: sorted(t for t in e if not t.startswith("badam_hf.core")) for m, e in import_graph().items()
               if m.startswith("badam_hf.core")}
    assert {m: t for m, t in outside.items() if t} == {}
    assert len(outside) >= 7  # config, errors, masters, optimizer, partition, schedule, truncation, __init__


def test_plain_step_holds_only_the_algorithm():
    source = inspect.getsource(BlockOptimizer.step).lower()
    for word in ("ds_id", "deepspeed", "fsdp", "ddp", "dtensor", "rebind", "named_parameters", "distributed"):
        assert word not in source, word


# --- extension points -------------------------------------------------------------------------------------


@pytest.fixture
def tiny(tiny_llama):
    def build(layers=3, dtype=torch.bfloat16):
        return tiny_llama(layers, dtype=dtype, vocab=32, hidden=16, intermediate=32, heads=2, kv_heads=1,
                          max_positions=32)

    return build


def step(model, opt):
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(opt.global_step))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_a_construction_check_refuses_before_the_model_changes_and_its_handle_removes_it(tiny):
    model = tiny()
    seen = []

    def refuse(m):
        seen.append(m)
        raise DistributedSetupError("no, for the test")

    handle = BlockOptimizer.register_construction_check(refuse)
    try:
        with pytest.raises(DistributedSetupError, match="no, for the test"):
            BlockOptimizer(model, switch_every=1)
        assert seen == [model]
        assert all(p.requires_grad for p in model.parameters())  # untouched
    finally:
        handle.remove()
    BlockOptimizer(model, switch_every=1)
    assert len(seen) == 1


def test_switch_hooks_and_init_hooks_run_and_their_handles_remove_them(tiny):
    made = []
    init = BlockOptimizer.register_init_hook(made.append)
    try:
        model = tiny()
        opt = BlockOptimizer(model, switch_every=1, switch_mode="ascending", lr=1e-2)
    finally:
        init.remove()
    assert made == [opt]
    switches = []
    hook = lambda o: switches.append(o.active_block)  # noqa: E731
    handle = opt.register_switch_hook(hook)
    assert opt.switch_hooks == [hook]
    step(model, opt)
    step(model, opt)
    handle.remove()
    step(model, opt)
    assert switches == [1, 2] and opt.switch_hooks == []
    BlockOptimizer(tiny(), switch_every=1)
    assert made == [opt]  # removed: not called for later optimizers


def test_torch_state_dict_hooks_run_on_a_block_optimizer(tiny):
    model = tiny()
    opt = BlockOptimizer(model, switch_every=2, switch_mode="ascending", lr=1e-2)
    step(model, opt)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 7})
    sd = opt.state_dict()
    assert sd["extra"] == 7 and sd["badam"]["step"] == 1

    other = BlockOptimizer(tiny(), switch_every=2, switch_mode="ascending", lr=1e-2)
    other.register_load_state_dict_pre_hook(lambda o, s: calls.append(("load-pre", s["extra"])))
    other.register_load_state_dict_post_hook(lambda o: calls.append(("load-post", o.global_step)))
    other.load_state_dict(sd)
    assert calls == ["save-pre", ("load-pre", 7), ("load-post", 1)]


def test_a_driver_owns_the_step_and_the_masters(tiny):
    model = tiny()
    opt = BlockOptimizer(model, switch_every=2, switch_mode="ascending", lr=1e-2)
    step(model, opt)
    assert len(opt.masters) > 0  # bf16 weights: fp32 masters for the active block (made at its first step)

    class Driver:
        steps = 0

        def step(self, closure=None):
            Driver.steps += 1
            opt.advance()

    handle = opt.attach_driver(Driver())
    assert opt.driver is not None and len(opt.masters) == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, opt)
    assert Driver.steps == 1 and opt.global_step == 2 and opt.active_block == 1
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the driver changed nothing
    handle.remove()
    assert opt.driver is None
    opt.seek(opt.global_step)
    step(model, opt)
    assert len(opt.masters) > 0


def test_parameters_replaced_after_the_optimizer_was_built_are_picked_up_at_the_first_step(tiny):
    # What accelerate's FSDP2 prepare does to the Trainer's optimizer: every parameter becomes a new object.
    torch.manual_seed(0)
    model, reference = tiny(dtype=torch.float32), tiny(dtype=torch.float32)
    opt = BlockOptimizer(model, switch_every=1, switch_mode="ascending", lr=1e-2)
    ref_opt = BlockOptimizer(reference, switch_every=1, switch_mode="ascending", lr=1e-2)
    old = dict(model.named_parameters())
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(p.detach().clone()))
    assert all(old[n] is not p for n, p in model.named_parameters())
    for _ in range(3):
        step(model, opt)
        step(reference, ref_opt)
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n
    assert all(opt.params_by_name[n] is p for n, p in model.named_parameters())
    assert any(not torch.equal(old[n], p) for n, p in model.named_parameters())  # the new ones trained


# --- one error family ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,builtin", [(BAdamConfigError, ValueError), (CheckpointMismatchError, ValueError),
                                         (DistributedSetupError, RuntimeError), (RecipeError, ValueError)])
def test_every_error_is_a_badam_error_and_keeps_its_builtin(cls, builtin):
    assert issubclass(cls, BAdamError) and issubclass(cls, builtin)


def test_a_checkpoint_of_another_run_is_a_checkpoint_mismatch(tiny):
    model = tiny()
    sd = BlockOptimizer(model, switch_every=2, lr=1e-2).state_dict()
    other = BlockOptimizer(tiny(), switch_every=3, lr=1e-2)
    with pytest.raises(CheckpointMismatchError, match="switch_every=2 but this run has switch_every=3"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError):  # existing `except ValueError` clauses keep working
        other.load_state_dict({"state": {}})
