"""Block graphs: torch.fx traces of one decoder layer at a time, and networkx views.

transformers 5 has no FX tracer of its own and whole-model ``symbolic_trace``
fails on every family, but one decoder layer traces when it is called from a
small wrapper with an explicit signature (:class:`BlockWrapper`) and the
attention module is kept opaque (a leaf). With ``leaves="children"`` (the
default) every direct child of the layer (norms, MLP, dropouts) is a leaf too,
which gives the compact graph a person wants to read; ``leaves="attention"``
traces into norms and MLPs.

Node keys are stable between a teacher and its student: module nodes are keyed
by their module path (``model.layers.3.self_attn``; a second call of the same
module gets ``#1``), ``getitem`` on a module output by ``<path>[i]``, other
functional nodes by ``<layer path>::<op>`` plus ``#k`` for the k-th occurrence
of that op in the block, inputs by ``<layer path>::in:<name>`` and the output by
``<layer path>::out``. FX's generated names are never used as keys.

:func:`check_splice` checks a splice numerically: the teacher's FX block graph,
with its call_module targets bound to the student's modules (the attention
target to the new mixer), must compute what the eager student layer computes
when called exactly as the model calls it.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from rewrites.adapters import FamilyAdapter, get_adapter
from surgery.mixers.base import Mixer

Leaves = Literal["children", "attention"]
INPUTS = ("hidden_states", "attention_mask", "position_ids", "cos", "sin")


class TraceError(RuntimeError):
    """A decoder layer could not be traced (unsupported control flow in its forward)."""


class BlockWrapper(nn.Module):
    """FX root for one decoder layer: explicit inputs, the layer called as its model calls it."""

    def __init__(self, layer: nn.Module, adapter: FamilyAdapter) -> None:
        super().__init__()
        self.layer = layer
        self._adapter = adapter  # not a module: plain attribute

    def forward(
        self,
        hidden_states: torch.Tensor,  # (b, L, d)
        attention_mask: torch.Tensor | None,  # (b, 1, L, L) or None
        position_ids: torch.Tensor | None,  # (b, L)
        cos: torch.Tensor | None,  # (b, L, rotary_dim); unused without RoPE
        sin: torch.Tensor | None,
    ) -> torch.Tensor:
        pe = (cos, sin) if self._adapter.uses_position_embeddings else None
        return self._adapter.call_layer(self.layer, hidden_states, attention_mask, position_ids, pe)


class _BlockTracer(fx.Tracer):
    """Keeps the attention (or mixer) opaque; with ``leaves="children"`` every child of the layer too."""

    def __init__(self, attention_name: str, leaves: Leaves) -> None:
        super().__init__()
        self.attention_qualname = f"layer.{attention_name}"
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == self.attention_qualname or isinstance(m, Mixer):
            return True
        if self.leaves == "children" and module_qualified_name.count(".") == 1:
            # a child holding the attention deeper down (GPT-Neo's attn.attention) is traced through
            return not self.attention_qualname.startswith(module_qualified_name + ".")
        return super().is_leaf_module(m, module_qualified_name)


def _kind(path: str, module: nn.Module | None, attention: str) -> str:
    if module is None:
        return "function"
    if isinstance(module, Mixer):
        return "mixer"
    if path == attention:
        return "attention"
    name = type(module).__name__.lower()
    if "norm" in name:
        return "norm"
    if "mlp" in name or path.rsplit(".", 1)[-1] in ("mlp", "fc1", "fc2", "activation_fn"):
        return "mlp"
    if "dropout" in name:
        return "dropout"
    return "module"


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


@dataclass
class BlockGraph:
    """The FX graph of one decoder layer with stable node keys."""

    path: str  # "model.layers.3"
    layer: int
    attention: str  # "model.layers.3.self_attn"
    graph: fx.Graph = field(repr=False)
    root: BlockWrapper = field(repr=False)
    keys: dict[fx.Node, str] = field(repr=False)

    @property
    def model(self) -> nn.Module:
        """The model this block was traced from."""
        return self.root._adapter.model

    # ------------------------------------------------------------------ names

    def full_path(self, qualname: str) -> str:
        """Wrapper-relative ``layer.self_attn`` -> model path ``model.layers.3.self_attn``."""
        return self.path + qualname[len("layer") :] if qualname.startswith("layer") else qualname

    def module(self, path: str) -> nn.Module:
        """The module at model path ``path`` inside this block."""
        return self.root.get_submodule("layer" + path[len(self.path) :])

    def node(self, key: str) -> fx.Node:
        for n, k in self.keys.items():
            if k == key:
                return n
        raise KeyError(f"{key!r} is not a node of block {self.path}; nodes: {', '.join(self.keys.values())}")

    # ------------------------------------------------------------------ views

    def to_networkx(self) -> nx.DiGraph:
        """DiGraph keyed by stable node keys; attributes op, target, module_class, params, kind, label, layer."""
        g = nx.DiGraph(path=self.path, layer=self.layer, attention=self.attention)
        for n in self.graph.nodes:
            key = self.keys[n]
            module = None
            target: str = _op_name(n)
            if n.op == "call_module":
                target = self.full_path(str(n.target))
                module = self.root.get_submodule(str(n.target))
            elif n.op == "get_attr":
                target = self.full_path(str(n.target))
            params = sum(p.numel() for p in module.parameters()) if module is not None else 0
            g.add_node(
                key,
                op=n.op,
                target=target,
                module_class=type(module).__name__ if module is not None else None,
                params=params,
                kind={"placeholder": "input", "output": "output"}.get(n.op) or _kind(target, module, self.attention),
                label=_label(n, key, self.path),
                layer=self.layer,
            )
        for n in self.graph.nodes:
            for i, src in enumerate(n.all_input_nodes):
                g.add_edge(self.keys[src], self.keys[n], arg=i)
        return g

    def used_inputs(self) -> list[str]:
        """Placeholder names that some node reads (OPT/GPT-2 ignore cos/sin)."""
        return [str(n.target) for n in self.graph.nodes if n.op == "placeholder" and n.users]

    # ------------------------------------------------------------------ running

    def retarget(
        self,
        modules: Mapping[str, nn.Module] | None = None,
        model: nn.Module | None = None,
        layer: nn.Module | None = None,
    ) -> fx.GraphModule:
        """A GraphModule of this graph with call_module targets bound to other modules.

        ``modules`` maps model paths (``model.layers.3.self_attn``) to replacement
        modules; other targets are looked up in ``model`` (a whole model, e.g. the
        student) or ``layer`` (another decoder layer) when given, else in this
        block's own layer.
        """
        modules = dict(modules or {})
        holder: nn.Module = self.root
        if layer is not None:
            holder = nn.Module()
            holder.layer = layer
        bound: dict[str, Any] = {}
        for n in self.graph.nodes:
            if n.op not in ("call_module", "get_attr"):
                continue
            qual, full = str(n.target), self.full_path(str(n.target))
            if full in modules:
                bound[qual] = modules[full]
            elif model is not None and layer is None:
                bound[qual] = model.get_submodule(full) if n.op == "call_module" else _get_attr(model, full)
            else:
                bound[qual] = holder.get_submodule(qual) if n.op == "call_module" else _get_attr(holder, qual)
        return fx.GraphModule(bound, _clone_graph(self.graph))

    def run(self, call: BlockCall, gm: fx.GraphModule | None = None) -> torch.Tensor:
        """Run the (retargeted) graph on a captured call's tensors."""
        gm = gm if gm is not None else self.retarget()
        return gm(**call.fx_inputs())


def _clone_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    value_remap: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, value_remap)
    new.output(out)
    return new


def _get_attr(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _label(node: fx.Node, key: str, block_path: str) -> str:
    if node.op == "placeholder":
        return str(node.target)
    if node.op == "output":
        return "output"
    if key.startswith(block_path + "."):
        return key[len(block_path) + 1 :]
    return key.split("::", 1)[-1]


def _node_keys(graph: fx.Graph, block: str, full_path: Any) -> dict[fx.Node, str]:
    keys: dict[fx.Node, str] = {}
    seen: Counter[str] = Counter()
    for n in graph.nodes:
        if n.op == "placeholder":
            base = f"{block}::in:{n.target}"
        elif n.op == "output":
            base = f"{block}::out"
        elif n.op in ("call_module", "get_attr"):
            base = full_path(str(n.target))
        elif n.target is operator.getitem and isinstance(n.args[0], fx.Node) and isinstance(n.args[1], int):
            base = f"{keys[n.args[0]]}[{n.args[1]}]"
        else:
            base = f"{block}::{_op_name(n)}"
        k = seen[base]
        seen[base] += 1
        keys[n] = base if k == 0 else f"{base}#{k}"
    return keys


def trace_block(model: nn.Module, layer_idx: int, leaves: Leaves = "children", adapter: FamilyAdapter | None = None) -> BlockGraph:
    """Trace decoder layer ``layer_idx`` of ``model`` (real or meta) into a :class:`BlockGraph`."""
    adapter = adapter or get_adapter(model)
    path, layer = adapter.decoder_layers()[layer_idx]
    root = BlockWrapper(layer, adapter)
    try:
        graph = _BlockTracer(adapter.attention_name, leaves).trace(root)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise TraceError(f"could not trace {path} ({type(layer).__name__}, family {adapter.family}): {err}") from err
    block = BlockGraph(path=path, layer=layer_idx, attention=f"{path}.{adapter.attention_name}", graph=graph, root=root, keys={})
    block.keys = _node_keys(graph, path, block.full_path)
    return block


# --------------------------------------------------------------------------- whole model


@dataclass
class ModelGraph:
    """Embeddings, the sequence of block graphs, final norm and head."""

    family: str
    embeddings: list[str]
    blocks: list[BlockGraph]
    final_norm: str | None
    head: str | None
    model: nn.Module = field(repr=False)

    def to_networkx(self) -> nx.DiGraph:
        """One DiGraph: ``embed -> block 0 -> ... -> block n-1 -> final norm -> head``.

        The per-block inputs other than ``hidden_states`` (mask, positions, cos, sin)
        become shared model-level nodes ``model::<name>``.
        """
        g = nx.DiGraph(family=self.family)
        for path in self.embeddings:
            g.add_node(path, **_module_attrs(self.model, path, "embedding"))
        prev: list[str] = list(self.embeddings)
        for block in self.blocks:
            bg = block.to_networkx()
            shared = {f"{block.path}::in:{name}": f"model::{name}" for name in INPUTS[1:]}
            bg = nx.relabel_nodes(bg, shared)
            for name in INPUTS[1:]:
                key = f"model::{name}"
                if key in bg and bg.out_degree(key) == 0:
                    bg.remove_node(key)
                elif key in bg:
                    bg.nodes[key].update(kind="input", layer=None, label=name)
            g = nx.compose(g, bg)
            entry = f"{block.path}::in:hidden_states"
            for p in prev:
                g.add_edge(p, entry, arg=0)
            prev = [f"{block.path}::out"]
        for path, kind in ((self.final_norm, "norm"), (self.head, "head")):
            if path is None:
                continue
            g.add_node(path, **_module_attrs(self.model, path, kind))
            for p in prev:
                g.add_edge(p, path, arg=0)
            prev = [path]
        return g

    def params(self) -> dict[str, int]:
        """Parameter counts: embeddings, each block, final norm, head, total (shared tensors once)."""
        out: dict[str, int] = {}
        for path in self.embeddings:
            out[path] = _numel(self.model.get_submodule(path))
        for block in self.blocks:
            out[block.path] = _numel(block.root.layer)
        for path in (self.final_norm, self.head):
            if path is not None:
                out[path] = _numel(self.model.get_submodule(path))
        out["total"] = _numel(self.model)
        return out


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _module_attrs(model: nn.Module, path: str, kind: str) -> dict[str, Any]:
    m = model.get_submodule(path)
    return {"op": "call_module", "target": path, "module_class": type(m).__name__, "params": _numel(m), "kind": kind, "label": path, "layer": None}


def trace_model(model: nn.Module, leaves: Leaves = "children") -> ModelGraph:
    """Trace every decoder layer of ``model`` (real or meta)."""
    adapter = get_adapter(model)
    blocks = [trace_block(model, i, leaves, adapter) for i in range(len(adapter.decoder_layers()))]
    final_norm = adapter.final_norm_path if _has(model, adapter.final_norm_path) else None
    return ModelGraph(adapter.family, adapter.embedding_modules(), blocks, final_norm, adapter.head_path(), model)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


# --------------------------------------------------------------------------- real calls and the splice check


class _Captured(Exception):
    pass


@dataclass
class BlockCall:
    """The arguments a model passes to one decoder layer (captured from a real forward)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_states: torch.Tensor  # (b, L, d)
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None

    def with_hidden_states(self, hidden_states: torch.Tensor, layer: nn.Module) -> BlockCall:
        """The same call with other hidden states (bound by the layer's signature)."""
        import inspect

        bound = inspect.signature(layer.forward).bind(*self.args, **self.kwargs)
        bound.arguments["hidden_states"] = hidden_states
        return BlockCall(tuple(bound.args), dict(bound.kwargs), hidden_states, self.attention_mask, self.position_ids, self.position_embeddings)

    def fx_inputs(self) -> dict[str, Any]:
        """Keyword inputs of a block graph (every placeholder of :class:`BlockWrapper`)."""
        cos, sin = self.position_embeddings if self.position_embeddings is not None else (None, None)
        return dict(zip(INPUTS, (self.hidden_states, self.attention_mask, self.position_ids, cos, sin)))

    def eager(self, layer: nn.Module) -> torch.Tensor:
        """Call ``layer`` exactly as the model did."""
        out = layer(*self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def capture_block_call(model: nn.Module, layer_idx: int, input_ids: torch.Tensor, **forward_kwargs: Any) -> BlockCall:
    """Run ``model`` on ``input_ids (b, L)`` until decoder layer ``layer_idx`` and capture its arguments."""
    import inspect

    adapter = get_adapter(model)
    _, layer = adapter.decoder_layers()[layer_idx]
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["args"], seen["kwargs"] = args, dict(kwargs)
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, **forward_kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in seen:
        raise TraceError(f"decoder layer {layer_idx} was never called by {type(model).__name__}.forward")
    bound = inspect.signature(layer.forward).bind(*seen["args"], **seen["kwargs"])
    named = {**bound.arguments, **bound.arguments.get("kwargs", {})}
    return BlockCall(
        args=seen["args"],
        kwargs=seen["kwargs"],
        hidden_states=named["hidden_states"],
        attention_mask=named.get("attention_mask"),
        position_ids=named.get("position_ids"),
        position_embeddings=named.get("position_embeddings"),
    )


@dataclass(frozen=True)
class SpliceCheck:
    """Result of :func:`check_splice` for one block."""

    path: str
    layer: int
    student_max_abs_diff: float  # retargeted FX graph vs eager student layer
    teacher_max_abs_diff: float  # FX graph vs eager teacher layer (the trace is faithful)
    atol: float

    @property
    def ok(self) -> bool:
        return max(self.student_max_abs_diff, self.teacher_max_abs_diff) <= self.atol


def check_splice(
    teacher_block: BlockGraph,
    student: nn.Module,
    *,
    batch: int = 2,
    seq_len: int = 8,
    seed: int = 0,
    atol: float = 1e-5,
) -> SpliceCheck:
    """Check that the teacher's block graph, retargeted to ``student``'s modules, equals the eager student layer.

    ``student`` is the student model or just its decoder layer for this block.
    Inputs: the mask / positions / RoPE tables the teacher model itself passes to
    this layer for random token ids, and random hidden states ``(b, L, d)``.
    Also checks the trace itself (FX graph vs eager teacher layer).
    """
    teacher = teacher_block.model
    try:  # a whole model ...
        student_layer = student.get_submodule(teacher_block.path)
        lookup: dict[str, nn.Module] = {"model": student}
    except AttributeError:  # ... or one decoder layer
        student_layer = student
        lookup = {"layer": student}
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(teacher.config, "vocab_size", 256))
    ids = torch.randint(3, vocab, (batch, seq_len), generator=gen)
    call = capture_block_call(teacher, teacher_block.layer, ids.to(_device(teacher)))
    d = call.hidden_states.shape[-1]
    hidden = torch.randn(batch, seq_len, d, generator=gen).to(call.hidden_states)  # (b, L, d)
    call = call.with_hidden_states(hidden, student_layer)
    with torch.no_grad():
        fx_student = teacher_block.run(call, teacher_block.retarget(**lookup))
        eager_student = call.eager(student_layer)
        fx_teacher = teacher_block.run(call)
        eager_teacher = call.eager(teacher_block.root.layer)
    return SpliceCheck(
        path=teacher_block.path,
        layer=teacher_block.layer,
        student_max_abs_diff=float((fx_student - eager_student).abs().max()),
        teacher_max_abs_diff=float((fx_teacher - eager_teacher).abs().max()),
        atol=atol,
    )


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
