"""`python -m mlx_flash.chat`: mlx-lm's chat REPL on a model whose FFN is streamed.

The parser, the UI and the generation are mlx-lm's (`mlx_lm.chat`): the chat template,
one prompt cache kept across turns, streamed replies. Ours: the flash options, `--stats`
per turn, and Ctrl-C, which stops a reply, not the session.

Ctrl-C and the caches. The first Ctrl-C of a reply waits for the next safe point.
Between two tokens the reply ends there: the prompt cache holds the prompt and the
tokens shown, as after any reply. Between two prefill chunks the turn is undone: every
layer's KV cache is trimmed back to its length before the turn. A second Ctrl-C
interrupts at once, perhaps inside a layer (a KV cache half updated, a neuron cache
between admitting neurons and reading them): the prompt cache is rebuilt empty and the
neuron caches are emptied, so nothing half-written is ever used.
"""

import copy
import signal
import sys
import threading

import mlx.core as mx
from mlx_lm.chat import setup_arg_parser as mlx_setup_arg_parser
from mlx_lm.cli_ui import ChatUI, print_chat_help, print_header_panel
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .default_model import DEFAULT_MODEL, default_model_path
from .blas import prefer_fast_blas
from .errors import exit_on_error
from .generate import load_kwargs
from .options import add_flash_args
from .stats import FlashStats
from .utils import load

MODEL_HELP = (
    "A flash store, or a Hugging Face / MLX directory, hub id or .gguf file "
    f"(converted once into the cache). Default: {DEFAULT_MODEL}."
)


def setup_arg_parser():
    """mlx-lm's chat parser, with the flash options and our default model."""
    parser = mlx_setup_arg_parser()
    parser.description = (
        "Chat with an LLM whose FFN is streamed from the SSD (mlx_flash)"
    )
    parser.set_defaults(model=None)
    parser._option_string_actions["--model"].help = MODEL_HELP
    add_flash_args(parser)
    return parser


class FlashChatUI(ChatUI):
    """mlx-lm's chat UI, with our header, per-turn stats and interruptions."""

    def __enter__(self):
        a = self._args
        rows = [("model", str(a.model or DEFAULT_MODEL))]
        if a.adapter_path:
            rows.append(("adapter", str(a.adapter_path)))
        rows.append(("max tokens", f"{a.max_tokens:,}"))
        rows.append(("selector", a.selector))
        if a.dram_budget is not None:
            rows.append(("dram budget", str(a.dram_budget)))
        if a.system_prompt:
            rows.append(("system", a.system_prompt[:57]))
        print_header_panel(self._console, "mlx_flash.chat", rows)
        print_chat_help(self._console)
        return self

    def end_turn(self, response, context: int = 0, stats: FlashStats | None = None):
        super().end_turn(response)
        self._console.print(f"  [ui.muted]context {context} tokens[/ui.muted]")
        if stats is not None:
            print(stats.summary(), flush=True)

    def say_interrupted(self, kept: str):
        self._console.print(f"\n  [ui.warn]interrupted[/ui.warn] [ui.muted]{kept}[/]")


def main(argv=None):
    if argv is None:  # a command, not a call from Python
        prefer_fast_blas(hint=False)
    args = setup_arg_parser().parse_args(argv)
    try:
        with exit_on_error():
            run(args)
    except KeyboardInterrupt:  # while loading: no session yet
        sys.exit(130)


def run(args) -> None:
    mx.random.seed(args.seed)
    model, tokenizer = load(
        args.model or default_model_path(),
        adapter_path=args.adapter_path,
        tokenizer_config={"trust_remote_code": args.trust_remote_code},
        trust_remote_code=args.trust_remote_code,
        **load_kwargs(args),
    )
    sampler = make_sampler(
        args.temp,
        args.top_p,
        xtc_threshold=args.xtc_threshold,
        xtc_probability=args.xtc_probability,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )
    with FlashChatUI(args) as ui:
        prompt_cache = make_prompt_cache(model, args.max_kv_size)
        while True:
            try:
                query = ui.prompt()
            except (EOFError, KeyboardInterrupt):  # end of a script, Ctrl-D, Ctrl-C
                query = "q"
            if query == "q":
                ui.say_bye()
                break
            if query == "r":
                prompt_cache = make_prompt_cache(model, args.max_kv_size)
                ui.say_reset()
                continue
            if query == "h":
                ui.say_help()
                continue
            stats = copy.deepcopy(model.flash_stats)
            prompt = chat_prompt(tokenizer, query, args.system_prompt)
            response, outcome = reply(
                model, tokenizer, prompt, prompt_cache, ui.stream_token, args, sampler
            )
            if outcome == "rebuild":
                prompt_cache = make_prompt_cache(model, args.max_kv_size)
            if outcome != "done":
                ui.say_interrupted(KEPT[outcome])
            stats = model.flash_stats.since(stats) if args.stats else None
            ui.end_turn(response, prompt_cache[0].offset, stats)


KEPT = {
    "stopped": "the reply so far stays in the context",
    "undone": "the turn is undone",
    "rebuild": "context cleared",
}


def chat_prompt(tokenizer, query: str, system_prompt=None):
    """The tokens of one user turn, through the chat template when there is one."""
    if not tokenizer.has_chat_template:
        return tokenizer.encode(query)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": query})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


class _Undo(Exception):
    """Ctrl-C seen between two prefill chunks."""


def reply(model, tokenizer, prompt, prompt_cache, on_text, args, sampler):
    """Stream one reply into `on_text`, extending `prompt_cache`.

    Returns:
        ``(last GenerationResponse or None, outcome)``: ``done``; ``stopped`` (Ctrl-C
        between tokens: the cache holds the reply so far); ``undone`` (between
        prefill chunks: the cache is as before the turn); ``rebuild`` (interrupted
        anywhere else: the caller must make a new prompt cache; the neuron caches
        have been emptied).
    """
    before, last = [c.offset for c in prompt_cache], None
    with DeferredInterrupt() as ctrl_c:

        def progress(done, total):
            if ctrl_c.requested:
                raise _Undo

        stream = stream_generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            sampler=sampler,
            prompt_cache=prompt_cache,
            prefill_step_size=args.prefill_step_size,
            prompt_progress_callback=progress,
        )
        try:
            for response in stream:
                on_text(response.text)
                last = response
                if ctrl_c.requested:
                    return last, "stopped"
        except _Undo:
            if not all(c.is_trimmable() for c in prompt_cache):
                return last, "rebuild"
            for c, n in zip(prompt_cache, before):
                c.trim(c.offset - n)
            return last, "undone"
        except KeyboardInterrupt:
            empty_neuron_caches(model)
            return last, "rebuild"
        finally:
            stream.close()
    return last, "done"


class DeferredInterrupt:
    """Within it, the first Ctrl-C only sets `requested` (acted on at a safe point); a
    second raises KeyboardInterrupt at once. Off the main thread it changes nothing."""

    def __init__(self):
        self.requested, self._installed = False, False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self._installed = threading.current_thread() is threading.main_thread()
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
        return False


def empty_neuron_caches(model) -> None:
    """Forget every cached neuron: a layer interrupted between admitting neurons and
    reading them would otherwise compute with slots never filled."""
    for layer in model.layers:
        layer.mlp.forget()


if __name__ == "__main__":
    main()
