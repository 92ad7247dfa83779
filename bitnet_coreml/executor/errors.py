"""Input errors of the reference executor (all :class:`bitnet_coreml.errors.InputError`, exit code 2)."""

from __future__ import annotations

from bitnet_coreml.errors import InputError

__all__ = ["MissingInputError", "UnexpectedInputError", "InputShapeError", "InputDtypeError", "StateError"]


class MissingInputError(InputError):
    """A declared input was not given."""


class UnexpectedInputError(InputError):
    """An input was given that the package does not declare."""


class InputShapeError(InputError):
    """An input's shape differs from the declared one."""


class InputDtypeError(InputError):
    """An input's dtype differs from the declared one."""


class StateError(InputError):
    """A stateful package was called without a matching state object (or a stateless one with one)."""
