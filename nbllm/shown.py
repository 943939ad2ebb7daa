"""What a report object needs to show itself: its text is :meth:`lines`; ``str()``, IPython's pretty printer
and the notebook's HTML view (a ``<pre>``) all show those lines."""

from __future__ import annotations

import html
from typing import Any


class ShownAsLines:
    """Mixin for reports (status, fit estimates, doctor): subclasses give ``lines()``, the rest follows."""

    def lines(self) -> list[str]:
        raise NotImplementedError

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        return "<pre>" + html.escape(str(self)) + "</pre>"
