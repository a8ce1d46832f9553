"""`python -m mlx_flash.generate`: mlx-lm's generate command, FFN streamed from the
store.

Takes every `mlx_lm.generate` flag (the parser is mlx-lm's own) plus ours; flags that
cannot apply to a flash model raise a clear error.
"""

import json
import sys

import mlx.core as mx
from mlx_lm.generate import generate
from mlx_lm.generate import load as mlx_load
from mlx_lm.generate import setup_arg_parser as mlx_setup_arg_parser
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .default_model import DEFAULT_MODEL, default_model_path
from .blas import prefer_fast_blas
from .errors import FlashError, exit_on_error
from .options import FlashOptions, add_flash_args
from .utils import load


def setup_arg_parser():
    """mlx-lm's parser, with the flash options and our default model."""
    parser = mlx_setup_arg_parser()
    parser.description = "LLM inference with the FFN streamed from the SSD (mlx_flash)"
    parser.set_defaults(model=None)
    for action in parser._actions:
        if action.dest == "model":
            action.help = (
                "A flash store, or a Hugging Face / MLX directory, hub id or "
                ".gguf file "
                f"(converted once into the cache). Default: {DEFAULT_MODEL}."
            )
    add_flash_args(parser)
    return parser


def load_kwargs(args) -> dict:
    """`load`'s flash keyword arguments from the parsed flash options."""
    return {"options": FlashOptions.from_args(args)}


def check_applicable(args) -> None:
    if args.image:
        raise FlashError("--image does not apply: mlx_flash runs text models only")
    if args.quantize_activations:
        raise FlashError(
            "--quantize-activations does not apply: the FFN is computed from bundles"
        )


def main(argv=None):
    if argv is None:  # a command, not a call from Python
        prefer_fast_blas(hint=False)
    args = setup_arg_parser().parse_args(argv)
    with exit_on_error():
        check_applicable(args)
        run(args)


def run(args) -> None:
    if args.seed is not None:
        mx.random.seed(args.seed)
    using_cache = args.prompt_cache_file is not None
    tokenizer_config, model_path = {}, args.model
    if using_cache:
        prompt_cache, metadata = load_prompt_cache(
            args.prompt_cache_file, return_metadata=True
        )
        if isinstance(prompt_cache[0], QuantizedKVCache) and args.kv_bits not in (
            None,
            prompt_cache[0].bits,
        ):
            raise FlashError(
                "--kv-bits does not match the prompt cache", args.prompt_cache_file
            )
        tokenizer_config = json.loads(metadata["tokenizer_config"])
        model_path = model_path or metadata["model"]
    tokenizer_config["trust_remote_code"] = args.trust_remote_code
    model_path = model_path or default_model_path()

    model, tokenizer = load(
        model_path,
        adapter_path=args.adapter_path,
        tokenizer_config=tokenizer_config,
        trust_remote_code=args.trust_remote_code,
        **load_kwargs(args),
    )
    for eos_token in args.extra_eos_token:
        tokenizer.add_eos_token(eos_token)

    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = []
        if args.system_prompt is not None:
            messages.append({"role": "system", "content": args.system_prompt})
        messages.append({"role": "user", "content": prompt})
        has_prefill = args.prefill_response is not None
        if has_prefill:
            messages.append({"role": "assistant", "content": args.prefill_response})
        template_kwargs = json.loads(args.chat_template_config or "{}")
        prompt = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            continue_final_message=has_prefill,
            add_generation_prompt=not has_prefill,
            **template_kwargs,
        )
        if using_cache:  # the prefix is in the cache: keep only the new query
            messages[-1]["content"] = "<query>"
            marker = tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                continue_final_message=has_prefill,
                add_generation_prompt=not has_prefill,
            )
            prompt = prompt[marker.index("<query>") :]
    prompt = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)

    draft_model = None
    if args.draft_model is not None:  # an ordinary dense mlx-lm model
        draft_model, draft_tokenizer = mlx_load(args.draft_model)
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise FlashError("the draft model's tokenizer does not match the model's")
    sampler = make_sampler(
        args.temp,
        args.top_p,
        args.min_p,
        args.min_tokens_to_keep,
        top_k=args.top_k,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )
    response = generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        verbose=args.verbose,
        sampler=sampler,
        max_kv_size=args.max_kv_size,
        prefill_step_size=args.prefill_step_size,
        prompt_cache=prompt_cache if using_cache else None,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
        draft_model=draft_model,
        num_draft_tokens=args.num_draft_tokens,
    )
    if not args.verbose:
        print(response)
    if args.stats:
        print_stats(model)


def print_stats(model) -> None:
    store = model.flash_store
    s = store.read_totals()  # (both readers: one reads ahead)
    read = f"{s.bytes / 1e6:.1f} MB of bundles in {s.reads} reads"
    nbytes, seconds = s.bytes, s.seconds
    if model.flash_stream is not None:  # attention or the head streamed: its reads
        d = model.flash_stream.read_totals()
        read += f" + {d.bytes / 1e6:.1f} MB of the dense part in {d.reads} reads"
        nbytes, seconds = nbytes + d.bytes, seconds + d.seconds
    rate = nbytes / 1e9 / seconds if seconds else 0.0
    mode = "direct I/O" if store.reader.direct else "buffered I/O (direct refused)"
    print(f"[mlx_flash] read {read}, {seconds:.3f} s ({rate:.2f} GB/s, {mode})")
    print(f"[mlx_flash] reader: {model.flash_tuning.describe()}")
    print(model.flash_stats.summary())
    if getattr(model, "flash_hot_set", None) is not None:
        print(model.flash_hot_set.describe())
    tokens = max(model.flash_stats.tokens, 1)
    print(
        f"[mlx_flash] read per token: expected {model.flash_plan.expected()} (the "
        f"plan, warm caches), measured {model.flash_stats.bytes / tokens / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
