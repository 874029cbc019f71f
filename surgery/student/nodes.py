"""The ``surgery.nodes`` list: read off a student's module tree, checked against a plan, looked up by tensor name."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import StudentError


def base_class(model: nn.Module) -> type:
    """The teacher family's class (not the dynamic recurrent-cache subclass)."""
    cls = type(model)
    while "_surgery_recurrent" in cls.__dict__:
        cls = cls.__bases__[0]
    return cls


def student_nodes(student: nn.Module) -> list[dict[str, Any]]:
    """The ``surgery.nodes`` list read off the module tree (for saving a student without its plan).

    Each mixer becomes ``{"path", "layer", "rule", "mixer", "params"}`` with ``rule`` = the mixer's
    name (the built-in rules are named after their mixers). Kept attention is not recorded: without
    the plan, kept and unchanged nodes cannot be told apart, and neither changes the module tree.
    """
    from rewrites.registry import get_rule

    from ..mixers import Mixer

    nodes = []
    for path, module in student.named_modules():
        if not isinstance(module, Mixer):
            continue
        try:
            spec = get_rule(module.name)
        except KeyError:
            spec = None
        if spec is None or not spec.replaces:
            raise StudentError(
                f"the mixer at {path} ({module.name!r}) has no rewrite rule of the same name; pass plan= "
                "(the Plan returned by surgery.rewrite) so the rule is recorded"
            )
        nodes.append({"path": path, "layer": module.layer_idx, "rule": module.name, "mixer": module.name,
                      "params": module.params.model_dump(mode="json")})
    return nodes


def check_nodes_match(student: nn.Module, nodes: list[dict[str, Any]]) -> None:
    """The plan's node list must describe the student's module tree (else the saved student would not load)."""
    from ..mixers import Mixer

    mixers = {path: m for path, m in student.named_modules() if isinstance(m, Mixer)}
    recorded = {n["path"]: n for n in nodes if n.get("mixer")}
    for path, node in recorded.items():
        module = mixers.get(path)
        if module is None:
            raise StudentError(
                f"the plan says {path} became {node['mixer']!r} but the student has no mixer there; "
                "pass the plan returned together with this student by surgery.rewrite"
            )
        params = module.params.model_dump(mode="json")
        if module.name != node["mixer"] or params != node["params"]:
            raise StudentError(
                f"the plan's node {path} ({node['mixer']} {node['params']}) differs from the student's mixer "
                f"({module.name} {params}); pass the plan returned together with this student by surgery.rewrite"
            )
    extra = sorted(set(mixers) - set(recorded))
    if extra:
        raise StudentError(
            f"the student has mixers the plan does not list ({', '.join(extra[:3])}); pass the plan returned "
            "together with this student by surgery.rewrite, or plan=None to read the nodes off the module tree"
        )


def node_of(name: str, nodes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The replaced node whose mixer holds tensor ``name`` (None for tensors outside every mixer)."""
    for n in nodes:
        if n.get("mixer") and name.startswith(n["path"] + "."):
            return n
    return None
