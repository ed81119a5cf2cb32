"""The method registry: every federated method registers its strategy class where it is defined.

    @register_method("prunefl", spec=PruneFLSpec)
    class PruneFL(StaticSparse): ...

The recipe's `method.name` choices and method sections, `fedmef recipes
--reference`, the memory report and the docs' method list are derived from
`METHODS`, so adding a method touches its own file, its recipe and its tests.
A method's recipe section (`method.<section>`) is a dataclass of typed fields
(fedmef_toolkit.fields.spec_field) declared next to its strategy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    cls: type
    spec: type | None  # dataclass of the method's own recipe section, if any
    section: str | None  # its key under `method.`
    summary: str  # first line of the strategy's docstring

    @property
    def sparse(self) -> bool:
        """Whether clients train a masked model (the memory report measures it at the recipe's density)."""
        return bool(getattr(self.cls, "sparse", False))

    @property
    def dynamic(self) -> bool:
        """Whether the method changes masks on the method.sparsity.delta_t / t_end schedule."""
        return bool(getattr(self.cls, "dynamic", False))


METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, *, spec: type | None = None, section: str | None = None):
    """Class decorator: register a strategy under `name` (its recipe `method.name`), with its
    recipe section `spec` under `method.<section>` (default: the method's name)."""

    def deco(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered ({METHODS[name].cls.__qualname__})")
        taken = {i.section for i in METHODS.values()}
        sec = (section or name) if spec is not None else None
        if sec is not None and sec in taken:
            raise ValueError(f"recipe section method.{sec} is already taken")
        cls.name = name
        doc = (cls.__doc__ or "").strip().splitlines()
        METHODS[name] = MethodInfo(name, cls, spec, sec, doc[0] if doc else "")
        return cls

    return deco


def method_info(name: str) -> MethodInfo:
    return METHODS[name]


def build_strategy(recipe):
    """The strategy of `recipe.method.name`, constructed from the recipe."""
    return METHODS[recipe.method.name].cls(recipe)
