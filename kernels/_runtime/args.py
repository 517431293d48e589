"""An op's inputs by name, from its schema.

A custom op's ``setup_context`` and ``backward`` see the inputs as one tuple and must return one
gradient per input, in schema order. Reading or writing them by literal position breaks silently
when an argument is added; ``OpArgs(op)`` reads the names from the op's schema once, so
``backward`` writes ``spec.grads(x=gx, d=gd)`` and reads ``spec(inputs).cutoff``.

Settings that travel together (a filter's cutoff, basis, envelope and activation; an MM method
and its constants) are small named tuples; ``spec.settings(inputs, Settings)`` picks their fields
from the inputs by name.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import Tensor

Settings = TypeVar("Settings")


class OpArgs:
    """Names and positions of a custom op's inputs.

    ``spec(inputs)`` turns an input tuple into a named tuple (defaults filled in);
    ``spec.grads(**named)`` builds the tuple a backward returns (None for every input not
    named); ``spec.index[name]`` is an input's position.
    """

    def __init__(self, op: Any):
        schema = op._opoverload._schema
        self.op_name: str = f"{op._namespace}::{op._name}"
        self.names: tuple[str, ...] = tuple(a.name for a in schema.arguments)
        self.index: dict[str, int] = {n: k for k, n in enumerate(self.names)}
        self._defaults = tuple(a.default_value if a.has_default_value() else None
                               for a in schema.arguments)
        self.Inputs = namedtuple(self.op_name.replace("::", "_") + "_inputs",  # type: ignore[misc]
                                 self.names)

    def __call__(self, inputs) -> Any:
        """The inputs by name: from a tuple in schema order (possibly without trailing
        defaults), or from a mapping holding every name (an op body's ``locals()``)."""
        if isinstance(inputs, Mapping):
            return self.Inputs(*(inputs[n] for n in self.names))
        values = tuple(inputs)
        if len(values) < len(self.names):
            values = values + self._defaults[len(values):]
        return self.Inputs(*values)

    def grads(self, **named) -> tuple:
        """One gradient per input, in schema order: the named ones, None elsewhere."""
        result: list = [None] * len(self.names)
        for name, value in named.items():
            result[self._position(name)] = value
        return tuple(result)

    def positions(self, names) -> tuple[int, ...]:
        """Schema positions of ``names``."""
        return tuple(self._position(n) for n in names)

    def settings(self, inputs, cls: type[Settings]) -> Settings:
        """``cls`` (a named tuple) built from the inputs of the same names."""
        named = inputs if isinstance(inputs, self.Inputs) else self(inputs)
        return cls(*(getattr(named, f) for f in cls._fields))  # type: ignore[attr-defined]

    def tensor_slots(self, inputs) -> tuple[int, ...]:
        """Positions of the inputs that are tensors in this call (optional tensors may be None):
        what ``wanted_grads`` needs to map graph edges to inputs."""
        return tuple(k for k, x in enumerate(inputs) if isinstance(x, Tensor))

    def _position(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise KeyError(f"{self.op_name} has no input {name!r}; its inputs are "
                           f"{', '.join(self.names)}") from None
