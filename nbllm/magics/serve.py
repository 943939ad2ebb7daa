"""``%llm_serve``: the kernel's model as an OpenAI-compatible server (a thin call into :mod:`nbllm.serve`)."""

from __future__ import annotations

from IPython.core import magic_arguments
from IPython.core.magic import Magics, line_magic, magics_class

from ._common import lazy_arguments, parse_line, schema_arguments, user_errors


@magics_class
class ServeMagics(Magics):
    """Offer the loaded model to other programs over HTTP."""

    @line_magic
    @lazy_arguments()
    @schema_arguments("serve.ServeOptions")
    @magic_arguments.argument("--stop", action="store_true", help="Stop the server.")
    @user_errors
    def llm_serve(self, line: str) -> None:
        """Serve the loaded models (any loader) as an OpenAI-compatible API from a background thread.

        ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, streamed or not; the unnamed model
        answers under its id (and when a request names none), each model loaded ``--as NAME`` under its
        name. Requests join their model's queue (batched where it can batch) or wait their turn behind it,
        so cells keep working. Whatever models are loaded later are served.
        Examples::

            %llm_serve                              # http://127.0.0.1:8000/v1
            %llm_serve --host 0.0.0.0 --port 8001 --api-key-env NBLLM_SERVE_KEY
            %llm_serve --stop
        """
        args = parse_line(self.llm_serve, line)
        from ..serve import ServeOptions, serve, served_models, stop

        if args.stop:
            url = stop()
            print(f"Stopped serving at {url}." if url else "No server was running.")
            return
        server = serve(ServeOptions.from_namespace(args))
        served = list(served_models())
        what = ", ".join(served) if served else "the kernel's models (none is loaded yet: requests get 503 until one is)"
        key = f"; clients send the key in ${server.options.api_key_env}" if server.options.api_key_env else ""
        print(f"Serving {what} at {server.url} (OpenAI-compatible{key}). Stop with %llm_serve --stop.")
