"""`python -m mlx_flash.generate`: mlx-lm's generate command, FFN streamed from the store.

Takes every `mlx_lm.generate` flag (the parser is mlx-lm's own) plus ours; flags that
cannot apply to a flash model raise a clear error.
"""

import argparse
import json
import sys
from typing import Callable, Union

import mlx.core as mx
from mlx_lm.generate import generate
from mlx_lm.generate import load as mlx_load
from mlx_lm.generate import setup_arg_parser as mlx_setup_arg_parser
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .default_model import DEFAULT_MODEL, default_model_path
from .blas import prefer_fast_blas
from .budget import BUDGET_FORMS, parse_budget
from .errors import FlashError, exit_on_error
from .selectors import SELECTORS
from .utils import OPTION_RULES, check_option, load


def setup_arg_parser():
    """mlx-lm's parser, with the flash options and our default model."""
    parser = mlx_setup_arg_parser()
    parser.description = "LLM inference with the FFN streamed from the SSD (mlx_flash)"
    parser.set_defaults(model=None)
    for action in parser._actions:
        if action.dest == "model":
            action.help = (
                "A flash store, or a Hugging Face / MLX directory, hub id or .gguf file "
                f"(converted once into the cache). Default: {DEFAULT_MODEL}."
            )
    add_flash_args(parser)
    return parser


def add_flash_args(parser):
    """Add the flash options, one argument group, to an mlx-lm parser."""
    flash = parser.add_argument_group("mlx_flash")
    flash.add_argument(
        "--compute-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="Dtype of the computation (default: float32 on CPU, the model's on GPU)",
    )
    flash.add_argument(
        "--threads",
        type=flag_type("threads"),
        default=None,
        help="Parallel reads in flight (default: from `python -m mlx_flash.probe`, "
        "else 4)",
    )
    flash.add_argument(
        "--selector",
        choices=SELECTORS,
        default="all",
        help="How each token's neurons are chosen: all (naive), oracle (true top "
        "activations, a reference), gate (resident gate rows; needs --layout gate) "
        "or lowrank (learned predictors; see mlx_flash.train_predictors)",
    )
    flash.add_argument(
        "--fraction",
        type=flag_type("fraction"),
        default=None,
        help="Share of FFN neurons used per token (gated models; default 0.5)",
    )
    flash.add_argument(
        "--threshold",
        type=flag_type("threshold"),
        default=None,
        help="Select |activation| > this (lowrank: predicted logit > this)",
    )
    flash.add_argument(
        "--recall",
        type=flag_type("recall"),
        default=None,
        help="lowrank: each layer's threshold calibrated for this recall "
        "(0.5, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99; default 0.9)",
    )
    flash.add_argument(
        "--window",
        type=flag_type("window"),
        default=None,
        help="Keep exactly the neurons of the last K tokens (paper's windowing); "
        "default: as many recent neurons as the cache holds",
    )
    flash.add_argument(
        "--dram-budget",
        type=dram_budget,
        default=None,
        help="DRAM for the model: bytes with a unit (8GiB, 500MB, 1.5G: powers of "
        "1024), a byte count (123456), a fraction in (0, 1] of the store's size on "
        "disk (0.5: half of it), or a percentage of that size (125%%)",
    )
    flash.add_argument(
        "--gap",
        type=flag_type("gap"),
        default=None,
        help="Read up to N unneeded neurons to merge reads (default: the probe's "
        "gap, else ~24 KiB worth)",
    )
    flash.add_argument(
        "--reader",
        choices=["direct", "mmap"],
        default="direct",
        help="direct: preadv bypassing the page cache (default); mmap: the OS pages it",
    )
    flash.add_argument(
        "--verify",
        action="store_true",
        help="Check every checksum of the store before generating (reads it all)",
    )
    flash.add_argument(
        "--stats", action="store_true", help="Print per-token I/O, memory and compute"
    )
    return flash


def flag_type(name: str) -> Callable[[str], Union[int, float]]:
    """An argparse `type` for the flash option `name`: its number, or one clear
    error (exit status 2) stating the rule of `utils.OPTION_RULES`."""
    kind, rule = OPTION_RULES[name][:2]

    def parse(text: str) -> Union[int, float]:
        try:
            value = kind(text)
            check_option(name, value)
        except (ValueError, FlashError):
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text!r}") from None
        return value

    parse.__name__ = name
    return parse


def dram_budget(text: str) -> str:
    """An argparse `type` for --dram-budget: `text`, once `parse_budget` reads it."""
    try:
        parse_budget(text, 1)
    except FlashError:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r}: give {BUDGET_FORMS}"
        ) from None
    return text


def load_kwargs(args) -> dict:
    """The flash keyword arguments of `load`, from the parsed flash options."""
    names = "threads selector fraction threshold recall window dram_budget gap reader verify"
    kwargs = {name: getattr(args, name) for name in names.split()}
    dtype = args.compute_dtype
    return {"compute_dtype": getattr(mx, dtype) if dtype else None, **kwargs}


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
    s = store.reader.stats
    rate = s.bytes / 1e9 / s.seconds if s.seconds else 0.0
    mode = "direct I/O" if store.reader.direct else "buffered I/O (direct refused)"
    print(
        f"[mlx_flash] read {s.bytes / 1e6:.1f} MB of bundles in {s.reads} reads, "
        f"{s.seconds:.3f} s ({rate:.2f} GB/s, {mode})"
    )
    print(f"[mlx_flash] reader: {model.flash_tuning.describe()}")
    print(model.flash_stats.summary())


if __name__ == "__main__":
    main()
