"""``%llm_doctor``: this machine's findings, and for a model the memory it needs and the options that fit."""

from __future__ import annotations

from IPython.core import magic_arguments
from IPython.core.magic import Magics, line_magic, magics_class

from ._common import lazy_arguments, parse_line, user_errors


@magics_class
class FitMagics(Magics):
    """What fits on this machine, before loading."""

    @line_magic
    @lazy_arguments()
    @magic_arguments.argument("model", nargs="?", help="A model folder, a .gguf file, or a models-folder name.")
    @magic_arguments.argument("--context", type=int, metavar="TOKENS",
                              help="Plan the KV cache for this many tokens (default: the model's, at most 8192).")
    @user_errors
    def llm_doctor(self, line: str) -> object:
        """This machine's GPUs (or why none is usable), RAM, disk and libraries, with the fixes; for MODEL,
        its memory estimate and the recommended load options, one reason per option, its saved settings
        and what worked here. Reads config.json / safetensors headers / the GGUF header, never the weights::

            %llm_doctor
            %llm_doctor TheBloke_Llama-2-7B-fp16
            %llm_doctor llama-2-7b-chat.Q4_K_M.gguf --context 4096
        """
        from ..fit import doctor

        args = parse_line(self.llm_doctor, line)
        return doctor(args.model, context=args.context)
