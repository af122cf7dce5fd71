"""`qwen3build` console script. Subcommand `run`: generate text with a built stack.

    qwen3build run --prompt "def fibonacci(n):" --max-new-tokens 64 --stats
    qwen3build run --prompt "..." --decode-mode sample --temperature 0.8 --min-p 0.05 --seed 7

The generated text goes to stdout; everything else (which backend ran, stop reason,
stats, progress) goes to stderr through logging. A user error is one line on stderr and
exit status 2. docs/run.md has the details.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import BuildError

log = logging.getLogger("qwen3build.cli")

USAGE_ERROR = 2
INTERRUPTED = 130
STOP_MESSAGES = {
    "eos": "stopped at end-of-sequence token",
    "max_new_tokens": "stopped after --max-new-tokens={max_new_tokens} tokens",
    "context": ("stopped: the context capacity of {seq_len} tokens (SEQ_LEN) is full; rebuild with "
                "`./dev build SEQ_LEN=<more>` for longer runs"),
}
# Options that only mean something when sampling: given with --decode-mode greedy they
# would be ignored, so they are refused instead.
SAMPLING_ONLY = ("temperature", "min_p", "coherence", "seed")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), like every other error."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _add_run_parser(subparsers) -> None:
    from .runtime.backends import BACKENDS

    run = subparsers.add_parser("run", help="generate text with a built stack",
                                description="Generate text with a built stack (see docs/run.md).")
    run.add_argument("--models-dir", help="a build's OUT_DIR holding stack.json, or an unzipped release "
                                          "(default: the default build's artifacts/coreml/packages)")
    run.add_argument("--tokenizer", help="tokenizer.json (default: the one stack.json names)")
    prompt = run.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text; '-' reads it from stdin")
    prompt.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a UTF-8 text file")
    run.add_argument("--no-chat-template", action="store_true",
                     help="send the prompt as is even when the tokenizer has a chat template")
    run.add_argument("--max-new-tokens", type=int, default=128, help="token budget (default 128)")
    run.add_argument("--decode-mode", choices=("greedy", "sample"), default="greedy",
                     help="greedy: argmax (after the repetition penalty); sample: the sampler's rules")
    run.add_argument("--temperature", type=float, help="sample mode, > 0 (default 0.7)")
    run.add_argument("--min-p", type=float, help="sample mode, in [0, 1] (default 0.05)")
    run.add_argument("--coherence", type=float,
                     help="sample mode, coherence-modulation strength in [0, 1] (default 0: off)")
    run.add_argument("--repetition-penalty", type=float, help="> 0, 1 = off (default 1); both modes")
    run.add_argument("--seed", type=int, help="sample mode: host RNG seed (default: a fresh one, logged)")
    run.add_argument("--stream-mode", choices=("word", "token"), default="word",
                     help="write text per whole word (default) or per token")
    run.add_argument("--stats", action="store_true",
                     help="report time to first token, prefill and decode tokens/s")
    run.add_argument("--prefill-progress", action="store_true", help="show progress while the prompt is read")
    run.add_argument("--no-prefill", action="store_true",
                     help="read the prompt one token per call (decode) even when the stack has a prefill function")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto (Core ML on macOS, else evaluator), coreml, evaluator, torch, coreai (the "
                          ".aimodel packages of a FORMATS=coreai build; COREAI_COMPUTE_UNIT picks the compute "
                          "unit on macOS 27)")
    run.add_argument("-v", "--verbose", action="store_true", help="log every package opened and more")
    run.set_defaults(handler=run_command)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="qwen3build", description="Qwen3 -> split Core ML deployment tools")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrorParser)
    _add_run_parser(subparsers)
    _add_cache_parser(subparsers)
    return parser


def _add_cache_parser(subparsers) -> None:
    cache = subparsers.add_parser("cache", help="status, verification and eviction of the action cache",
                                  description="Look after the action cache (docs/build.md).")
    actions = cache.add_subparsers(dest="cache_command", required=True, parser_class=OneLineErrorParser)
    for name, text in (("status", "entries and bytes by kind, and what the settings use"),
                       ("verify", "check every entry's files against their recorded digests"),
                       ("gc", "evict least recently used entries (never ones in use)")):
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument("settings", nargs="*", metavar="NAME=value",
                         help="build settings as for doit (CACHE_DIR, OUT_DIR, CONFIG, ...)")
        if name == "gc":
            sub.add_argument("--max-size", required=True, help="keep the cache at most this big, e.g. 20G")
        sub.add_argument("-v", "--verbose", action="store_true", help="log more")
        sub.set_defaults(handler=cache_command)


def cache_command(args) -> int:
    from .build import cache_admin
    from .build.actions import Builder
    from .build.plan import make_plan
    from .settings.settings import SETTING_KEYS, parse_size, unknown_setting

    overrides = {}
    for item in args.settings:
        name, sep, value = item.partition("=")
        if not sep:
            raise BuildError(f"{item!r} is not NAME=value")
        if name not in SETTING_KEYS:
            raise unknown_setting(name)
        overrides[name] = value
    builder = Builder(make_plan(overrides))
    if args.cache_command == "status":
        print(cache_admin.format_status(cache_admin.status(builder)))
        return 0
    builder.lock()  # never while a build of this tree runs
    if args.cache_command == "verify":
        checked, damaged = cache_admin.verify_all(builder.cache)
        print(f"{checked} entries checked, {len(damaged)} damaged" + "".join(f"\n  {line}" for line in damaged))
        return 1 if damaged else 0
    limit = parse_size(args.max_size, "--max-size")
    removed, freed = cache_admin.collect_garbage(builder, limit)
    print(f"removed {removed} entries, freed {cache_admin.human(freed)}")
    return 0


def sampler_settings(args) -> tuple:
    """(SamplerSettings, seed) from the options; refuses sampling options in greedy mode."""
    import secrets

    from .graph.sampler import DEFAULT_COHERENCE, DEFAULT_MIN_P, DEFAULT_TEMPERATURE, SamplerSettings

    penalty = 1.0 if args.repetition_penalty is None else args.repetition_penalty
    if args.decode_mode == "greedy":
        given = [f"--{name.replace('_', '-')}" for name in SAMPLING_ONLY if getattr(args, name) is not None]
        if given:
            raise BuildError(f"{', '.join(given)} only apply with --decode-mode sample (greedy takes the argmax)")
        return SamplerSettings(temperature=0.0, min_p=0.0, repetition_penalty=penalty, coherence=0.0), None
    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    if not temperature > 0:
        raise BuildError(f"--temperature={temperature} must be above 0 when sampling; "
                         f"use --decode-mode greedy for argmax decoding")
    if args.seed is not None and args.seed < 0:
        raise BuildError(f"--seed={args.seed} must be 0 or more")
    try:
        settings = SamplerSettings(
            temperature=temperature,
            min_p=DEFAULT_MIN_P if args.min_p is None else args.min_p,
            repetition_penalty=penalty,
            coherence=DEFAULT_COHERENCE if args.coherence is None else args.coherence)
    except BuildError as error:  # name the option as the user wrote it
        raise BuildError(f"--{str(error).replace('_', '-')}") from None
    return settings, (secrets.randbits(32) if args.seed is None else args.seed)


def read_prompt(args) -> str:
    """--prompt TEXT, --prompt - (stdin) or --prompt-file PATH."""
    from pathlib import Path

    if args.prompt_file is not None:
        path = Path(args.prompt_file).expanduser()
        try:
            prompt = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BuildError(f"--prompt-file {path} does not exist; give a UTF-8 text file") from None
        except IsADirectoryError:
            raise BuildError(f"--prompt-file {path} is a directory; give a UTF-8 text file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BuildError(f"--prompt-file {path}: cannot read as UTF-8 text ({exc})") from None
        if not prompt:
            raise BuildError(f"--prompt-file {path} is empty; give the text to continue")
        return prompt
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt:
        raise BuildError("--prompt is empty; give the text to continue")
    return prompt


def default_models_dir():
    """OUT_DIR of the default build: qwen3build.toml's, or the OUT_DIR environment variable."""
    import os
    from pathlib import Path

    from .paths import DEFAULTS_FILE
    from .settings.defaults import read_defaults
    out_dir = os.environ.get("OUT_DIR") or read_defaults().settings["OUT_DIR"]
    return (DEFAULTS_FILE.parent / Path(out_dir).expanduser()).resolve()


def coreai_compute_unit() -> str:
    """COREAI_COMPUTE_UNIT: the environment's, else qwen3build.toml's (validated)."""
    import os

    from .settings.defaults import read_defaults
    from .settings.settings import parse_choice
    from .stack import COREAI_COMPUTE_UNITS
    raw = os.environ.get("COREAI_COMPUTE_UNIT") or read_defaults().settings["COREAI_COMPUTE_UNIT"]
    return parse_choice("COREAI_COMPUTE_UNIT", raw, COREAI_COMPUTE_UNITS)


def run_command(args) -> int:
    from pathlib import Path

    from .paths import STACK_FILE
    from .runtime import backends, generate, text
    from .stack import load_stack

    if args.max_new_tokens < 1:
        raise BuildError(f"--max-new-tokens={args.max_new_tokens} must be at least 1")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise BuildError(f"--repetition-penalty={args.repetition_penalty} must be above 0 (1 = off)")
    settings, seed = sampler_settings(args)
    prompt = read_prompt(args)
    models_dir = Path(args.models_dir) if args.models_dir else default_models_dir()
    stack = load_stack(models_dir)
    tokenizer = Path(args.tokenizer) if args.tokenizer else stack.tokenizer
    if tokenizer is None:
        raise BuildError(f"{models_dir / STACK_FILE} names no tokenizer (the checkpoint has no "
                         f"tokenizer.json); pass --tokenizer path/to/tokenizer.json")
    codec = text.TextCodec(tokenizer)
    use_template = bool(codec.chat_template) and not args.no_chat_template
    prompt_ids = codec.encode_prompt(prompt, use_chat_template=use_template)
    if max(prompt_ids, default=0) >= stack.vocab_size:
        raise BuildError(f"tokenizer {codec.path} produced id {max(prompt_ids)} but the model's vocabulary has "
                         f"{stack.vocab_size} entries: wrong --tokenizer for this stack")
    compute_unit = coreai_compute_unit() if args.backend == "coreai" else "default"
    backend = backends.open_backend(stack, args.backend, use_prefill=not args.no_prefill, compute_unit=compute_unit)
    mode = "greedy" if settings.greedy else (
        f"sample (temperature {settings.temperature}, min-p {settings.min_p}, coherence {settings.coherence}, "
        f"seed {seed})")
    reading = (f"prefill blocks of {backend.prefill_len}" if backend.prefill_len else
               "one token per call (--no-prefill)" if args.no_prefill and stack.prefill_len else
               "one token per call (the stack has no prefill function: PREFILL_LEN=0)")
    log.info("backend: %s (%s); %s; repetition penalty %s over the last %d tokens; prompt %d tokens, %s%s",
             backend.name, backend.description, mode, settings.repetition_penalty, backend.window,
             len(prompt_ids), reading, " (chat template applied)" if use_template else "")
    stream = text.TextStream(codec, args.stream_mode)
    generation = generate.generate(
        backend, prompt_ids, settings, args.max_new_tokens, stack.eos_token_ids, stack.seq_len, seed=seed,
        on_token=stream, on_prefill=text.PrefillProgress() if args.prefill_progress else None)
    stream.finish()
    message = STOP_MESSAGES[generation.stop_reason].format(max_new_tokens=args.max_new_tokens, seq_len=stack.seq_len)
    (log.warning if generation.stop_reason == "context" else log.info)("%s (%d tokens generated)",
                                                                       message, len(generation.tokens))
    if args.stats:
        log.info("stats: backend=%s prompt_tokens=%d generated_tokens=%d stop=%s", backend.name,
                 generation.prompt_tokens, len(generation.tokens), generation.stop_reason)
        log.info("stats: time_to_first_token=%.3f s prefill=%.1f tokens/s decode=%.1f tokens/s",
                 generation.time_to_first_token, generation.prefill_tokens_per_second,
                 generation.decode_tokens_per_second)
        log.info("stats: prompt read in %d prefill call(s) of %d tokens and %d decode call(s)",
                 generation.prefill_calls, generation.prefill_len, generation.prompt_decode_calls)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .logs import configure

    parser = build_parser()
    args = parser.parse_args(argv)
    configure(logging.INFO if args.verbose else logging.WARNING)
    for name in ("qwen3build.cli", "qwen3build.runtime"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.handler(args)
    except BuildError as error:
        print(f"qwen3build {args.command}: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
