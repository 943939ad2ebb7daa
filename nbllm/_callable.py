"""A module callable as the function it is named after (``nbllm.evaluate``, ``nbllm.serve``).

``nbllm`` gives those functions at first use (its module ``__getattr__``), so ``%load_ext nbllm`` does not
import their modules. But importing a submodule sets the package's attribute of that name to the module,
so ``nbllm.evaluate`` may be the module: called, it runs its function.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def callable_as(module_name: str, function: Callable[..., Any]) -> None:
    """Make the module ``module_name`` callable as ``function``."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    CallableModule.__call__.__doc__ = function.__doc__
    sys.modules[module_name].__class__ = CallableModule
