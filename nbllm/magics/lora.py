"""``%llm_lora``: LoRA adapters on the loaded model, from a notebook (one call into :mod:`nbllm.lora` each)."""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument

from ..errors import OptionError
from ._common import get_engine, lazy_arguments, parse_line, schema_arguments, user_errors

ACTIONS = ("add", "remove", "list", "clear")


@magics_class
class LoraMagics(Magics):
    """Apply, stack, remove and list LoRA adapters."""

    @line_magic
    @lazy_arguments()
    @argument("action", nargs="?", default="list", choices=ACTIONS,
              help="add an adapter (on top of those applied; again with another --scale to change it), remove one, "
                   "list them (the default), or clear them all.")
    @argument("adapter", nargs="?", metavar="PATH|NAME|HUB_ID",
              help="add: a path, a name in the adapters folder (loras/ beside the models folder) or a hub id "
                   "organization/adapter[:revision] (downloaded first); remove: the name of an applied adapter.")
    @schema_arguments("lora.LoraOptions")
    @user_errors
    def llm_lora(self, line: str) -> Any:
        """LoRA adapters on the loaded model, without reloading it: %llm_lora add PATH|NAME|HUB_ID [--scale S],
        %llm_lora remove NAME, %llm_lora list, %llm_lora clear."""
        args = parse_line(self.llm_lora, line)
        from .. import lora

        typed = lora.LoraOptions.typed(args)
        if args.action == "list":
            return lora.lora_list()
        if args.action == "clear":
            applied = lora.lora_clear()
        elif args.adapter is None:
            raise OptionError(f"%llm_lora {args.action} needs an adapter",
                                   f"write %llm_lora {args.action} {'NAME' if args.action == 'remove' else 'PATH|NAME|HUB_ID'}")
        elif args.action == "add":
            applied = lora.lora_add(args.adapter, **typed)
        else:
            if typed:
                raise OptionError(f"%llm_lora remove takes no {', '.join(typed)}", "write %llm_lora remove NAME")
            applied = lora.lora_remove(args.adapter)
        engine = get_engine()
        print(lora.applied_line(engine.status().model if engine.loaded else None, applied))
        return None
