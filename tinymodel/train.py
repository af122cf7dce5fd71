"""Train the embedded default checkpoint: a small Qwen3-architecture Python code model.

    python -m tinymodel.train --out assets/qwen3-tiny             # full run
    python -m tinymodel.train --out /tmp/tok --tokenizer-only    # tokenizer files
    python -m tinymodel.train --out assets/qwen3-tiny --evaluate-only

Corpus: the running interpreter's standard-library ``.py`` sources (a sorted,
deterministic selection read at run time; nothing is downloaded). Tokenizer: byte-level
BPE with 2048 entries made by the ``tokenizers`` library on that corpus. Model:
transformers' Qwen3ForCausalLM (a dev tool here, never part of the build) trained with
AdamW from a fixed seed, saved in bf16 with the real Hugging Face tensor names and a
transformers-4 style config.json, exactly like a Qwen3 release.

The run is sized by the clock to fit ``--budget-minutes`` (see ``train``); the learning
rate of every step is recorded in training_record.json, and ``--replay RECORD`` reruns
that exact schedule. ``--steps N`` runs a fixed N-step schedule instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("tinymodel.train")

DEFAULT_SEED = 20250611

# Special tokens, in id order: they take ids 0, 1, 2. The end-of-text token separates
# files in the training stream and is both bos and eos (a code model, no chat turns).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 2048

# Directories of the standard library left out of the corpus: test suites, the IDLE and
# turtle demo applications, vendored wheels, and modules that are mostly data tables
# (codec charmaps, pydoc's topic dump) rather than code.
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
    "dist-packages", "encodings", "pydoc_data", "__pycache__", "lib-dynload",
})
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata", "stringprep")


@dataclass(frozen=True)
class ModelShape:
    """The shipped shape. head_dim * heads (384) != hidden (256), as in Qwen3-0.6B, and
    GQA with 3 query heads per KV head, so a builder that assumes either fails here."""

    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class TrainSettings:
    seed: int = DEFAULT_SEED
    context: int = 512            # tokens per training window
    batch_size: int = 2           # windows per step: 1024 tokens; more updates per token
    learning_rate: float = 3e-3   # peak; a 5M-parameter model tolerates a high rate
    min_lr_ratio: float = 0.1     # cosine decays to 10% of peak
    warmup_steps: int = 30
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    measure_steps: int = 6        # steps timed (after 2 untimed) to size the run
    # bf16 autocast for the matmuls (fp32 master weights, fp32 loss): measured 2.1x the
    # fp32 throughput on this AVX512-BF16 CPU, and the checkpoint ships in bf16 anyway.
    bf16_autocast: bool = True


# --------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[Path]:
    """Sorted standard-library sources, without the excluded directories."""
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in relative.parts[:-1]):
            continue
        if path.name.startswith(EXCLUDED_FILE_PREFIXES):
            continue
        files.append(path)
    if not files:
        raise RuntimeError(f"no .py sources found under {root}: is this a full CPython install?")
    return files


def read_corpus(files: list[Path]) -> list[str]:
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


def corpus_digest(root: Path, files: list[Path], texts: list[str]) -> str:
    """sha256 over (relative path, text) pairs: names the exact corpus a run saw."""
    digest = hashlib.sha256()
    for path, text in zip(files, texts):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE: every byte is in the base alphabet, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would change the first token of a file.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer has {tokenizer.get_vocab_size()} entries, wanted {vocab_size}: "
            "the corpus is too small to learn that many merges")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token!r} is not at id {expected_id}")
    return tokenizer


def tokenizer_config_dict() -> dict:
    """tokenizer_config.json in the layout Qwen releases use, minus the chat template:
    this is a code model with no chat turns (<|im_start|>/<|im_end|> exist only so the
    special-token layout matches a Qwen vocabulary)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(index): {
                "content": token, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False, "special": True,
            }
            for index, token in enumerate(SPECIAL_TOKENS)
        },
        "additional_special_tokens": [token for token in SPECIAL_TOKENS if token != EOS_TOKEN],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": ModelShape().max_position_embeddings,
        "pad_token": EOS_TOKEN,
        "split_special_tokens": False,
        # The generic fast class: it loads tokenizer.json as written. (Qwen2Tokenizer
        # would impose Qwen's own pre-tokenizer, which this vocabulary was not made with.)
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def write_tokenizer_files(tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config_dict())
    log.info("wrote %s and tokenizer_config.json (%d entries)",
             out_dir / "tokenizer.json", tokenizer.get_vocab_size())


# ---------------------------------------------------------------------------- config


def qwen3_config_dict(shape: ModelShape, eos_token_id: int) -> dict:
    """config.json in the transformers-4 key schema of the real Qwen3 releases
    (rope_theta / rope_scaling / torch_dtype; transformers 5 reads these and maps them
    onto its rope_parameters / dtype)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "max_window_layers": shape.num_hidden_layers,
        "model_type": "qwen3",
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        # The schema version real Qwen3 configs carry; it names the key layout above.
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": shape.vocab_size,
    }


def generation_config_dict(eos_token_id: int) -> dict:
    # Greedy by default: a code model, and the parity gate compares argmaxes.
    return {
        "bos_token_id": eos_token_id,
        "do_sample": False,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "transformers_version": "4.51.0",
    }


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- model


def build_model(config: dict):
    """A freshly initialised transformers Qwen3ForCausalLM from our config dict."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # transformers 5 renamed two keys of the release schema: rope_theta/rope_scaling
    # became rope_parameters, torch_dtype became dtype. Map them; pass the rest as is.
    not_constructor_keys = ("architectures", "model_type", "torch_dtype",
                            "transformers_version", "rope_theta", "rope_scaling")
    if config["rope_scaling"] is not None:
        raise ValueError("only rope_scaling null (default RoPE) is supported here")
    hf_config = Qwen3Config(
        **{key: value for key, value in config.items() if key not in not_constructor_keys},
        rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]})
    hf_config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(hf_config)


def hf_state_dict_bf16(model) -> dict:
    """The real HF tensor names in bf16; the tied lm_head.weight is not stored (Qwen3
    releases with tie_word_embeddings omit it too)."""
    import torch

    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[name] = tensor.detach().to(torch.bfloat16).contiguous().clone()
    return tensors


def save_weights(model, out_dir: Path) -> Path:
    from safetensors.torch import save_file

    path = out_dir / "model.safetensors"
    save_file(hf_state_dict_bf16(model), str(path), metadata={"format": "pt"})
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


# -------------------------------------------------------------------------- training


def window_batch(stream, context: int, batch_size: int, generator):
    """batch_size random windows of context+1 tokens: inputs and shifted labels."""
    import torch

    starts = torch.randint(0, stream.numel() - context - 1, (batch_size,), generator=generator)
    rows = torch.stack([stream[s:s + context + 1] for s in starts.tolist()])  # (B, T+1)
    return rows[:, :-1].long(), rows[:, 1:].long()  # (B, T), (B, T)


def lr_at(step: int, progress: float, settings: TrainSettings) -> float:
    """Linear warm-up over the first steps, then cosine decay over progress in [0, 1]."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return settings.learning_rate * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def make_optimizer(model, settings: TrainSettings):
    import torch

    # No weight decay on norms (1-D gains): decaying them pulls the RMSNorm gains to 0.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate, betas=settings.adam_betas, fused=False)


def train_step(model, optimizer, inputs, labels, lr: float, settings: TrainSettings) -> float:
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16_autocast):
        logits = model(input_ids=inputs).logits  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    return loss.item()


def train(model, stream, settings: TrainSettings, budget_seconds: float, steps: int | None,
          lr_trace: list[float] | None = None):
    """Train in place; returns (steps run, seconds, tokens/s over the run, lr per step).

    With ``steps``, the cosine runs over that many steps. Without, the run is sized by
    the clock: the first steps are timed to report the expected size, and the cosine
    then runs over the remaining wall-clock budget (progress = elapsed fraction after
    warm-up), ending when the budget is spent. On a shared machine the throughput can
    drop several-fold mid-run; a step count sized from the first steps would then
    overrun the budget, while this ends on time with the learning rate fully decayed.
    ``lr_trace`` (the lr_per_step of a training_record.json) replays a run exactly.
    """
    import torch

    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = make_optimizer(model, settings)
    model.train()
    tokens_per_step = settings.context * settings.batch_size
    started = time.perf_counter()
    deadline = started + budget_seconds
    warmup_done_at = None
    lrs: list[float] = []
    step = 0
    if lr_trace is not None:
        steps = len(lr_trace)
    while True:
        now = time.perf_counter()
        if steps is not None:
            if step >= steps:
                break
            progress = (step - settings.warmup_steps) / max(1, steps - settings.warmup_steps)
        else:
            if now >= deadline:
                break
            if step == settings.warmup_steps:
                warmup_done_at = now
            progress = 0.0 if warmup_done_at is None else (
                (now - warmup_done_at) / max(1e-9, deadline - warmup_done_at))
            if step == 2:
                timed_from = now
            if step == 2 + settings.measure_steps:
                rate = settings.measure_steps * tokens_per_step / (now - timed_from)
                log.info("measured %.0f tokens/s: about %d steps (%.2f M tokens) fit the %.0f s "
                         "budget at this rate", rate, budget_seconds * rate / tokens_per_step,
                         budget_seconds * rate / 1e6, budget_seconds)
        lr = lr_at(step, progress, settings) if lr_trace is None else lr_trace[step]
        inputs, labels = window_batch(stream, settings.context, settings.batch_size, generator)
        loss = train_step(model, optimizer, inputs, labels, lr, settings)
        lrs.append(lr)
        if step % 25 == 0:
            log.info("step %5d  loss %.4f  lr %.2e  progress %.2f  %.0f s", step, loss, lr,
                     max(0.0, progress), time.perf_counter() - started)
        step += 1
    seconds = time.perf_counter() - started
    log.info("trained %d steps (%.2f M tokens) in %.0f s", step, step * tokens_per_step / 1e6, seconds)
    model.eval()
    return step, seconds, step * tokens_per_step / seconds, lrs


# ------------------------------------------------------------------------ evaluation


# The parity gate counts only positions whose oracle top-2 logit margin is at least this.
PEAKED_MARGIN = 0.1


def peakedness(model, token_ids: list[int], window: int) -> dict:
    """Teacher-forced next-token statistics over non-overlapping windows of the text.

    Returns held-out loss (nats/token), median top-1 probability, the fraction of
    positions whose top-2 logit margin is >= PEAKED_MARGIN, and the position count."""
    import torch

    ids = torch.tensor(token_ids, dtype=torch.long)
    losses, top1_probs, margins = [], [], []
    with torch.no_grad():
        for start in range(0, ids.numel() - 1, window):
            chunk = ids[start:start + window + 1]
            if chunk.numel() < 2:
                break
            inputs, labels = chunk[:-1][None], chunk[1:]  # (1, T), (T,)
            logits = model(input_ids=inputs).logits[0].float()  # (T, V)
            losses.append(torch.nn.functional.cross_entropy(logits, labels, reduction="none"))
            top2 = logits.topk(2, dim=-1).values  # (T, 2)
            margins.append(top2[:, 0] - top2[:, 1])
            top1_probs.append(logits.softmax(-1).max(-1).values)
    loss = torch.cat(losses)
    top1 = torch.cat(top1_probs)
    margin = torch.cat(margins)
    return {
        "positions": int(loss.numel()),
        "heldout_loss": float(loss.mean()),
        "median_top1_prob": float(top1.median()),
        "fraction_margin_ge_0p1": float((margin >= PEAKED_MARGIN).float().mean()),
    }


def evaluate_checkpoint(checkpoint_dir: Path, heldout_path: Path, window: int) -> dict:
    """Load the written files the way the parity oracle does (bf16 on disk -> fp32)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import Qwen3ForCausalLM

    tokenizer = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
    token_ids = tokenizer.encode(heldout_path.read_text(encoding="utf-8")).ids
    model = Qwen3ForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32, local_files_only=True)
    model.eval()
    stats = peakedness(model, token_ids, window)
    stats["heldout_tokens"] = len(token_ids)
    stats["window"] = window
    return stats


# --------------------------------------------------------------------------- report

RECORD_NAME = "training_record.json"


def report(out_dir: Path, heldout_path: Path, window: int) -> dict:
    """Evaluate the written checkpoint on the held-out text and (re)write TRAINING.md
    from training_record.json plus the figures."""
    record_path = out_dir / RECORD_NAME
    if not record_path.is_file():
        raise FileNotFoundError(f"{record_path} is missing: train first (no --evaluate-only)")
    if not heldout_path.is_file():
        raise FileNotFoundError(
            f"held-out text {heldout_path} is missing; the weights are written, so add it and "
            "rerun with --evaluate-only to get the figures")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    record["heldout"] = evaluate_checkpoint(out_dir, heldout_path, window)
    from qwen3build.paths import REPO_ROOT
    resolved = heldout_path.resolve()
    shown = resolved.relative_to(REPO_ROOT) if resolved.is_relative_to(REPO_ROOT) else resolved
    record["heldout"]["text"] = str(shown)
    log.info("held-out figures: %s", record["heldout"])
    write_training_report(out_dir, record)
    return record


def write_training_report(out_dir: Path, record: dict) -> None:
    stats = record["heldout"]
    lines = [
        "# qwen3-tiny: how this checkpoint was trained",
        "",
        "Written by `tinymodel/train.py`; see docs/default-checkpoint.md.",
        "",
        "## Command",
        "",
        "```",
        record["command"],
        "```",
        "",
        f"Seed {record['seed']}, {record['steps']} steps, schedule sized by "
        f"{record.get('schedule', 'steps')}. To repeat this exact run (same per-step learning "
        "rates, whatever the machine's load), copy training_record.json out of the output "
        "directory and pass it as `--replay`; the corpus must be the same stdlib (digest below).",
        "",
        "## Corpus",
        "",
        f"- CPython {record['python']} standard library at run time: {record['corpus_files']} "
        f".py files, {record['corpus_bytes'] / 1e6:.2f} MB, {record['corpus_tokens'] / 1e6:.2f} M tokens",
        f"- corpus sha256 (relative paths + texts): `{record['corpus_sha256']}`",
        f"- excluded directories: {', '.join(sorted(EXCLUDED_DIRS))}; file prefixes "
        f"{', '.join(EXCLUDED_FILE_PREFIXES)}",
        "- held-out text (assets/heldout/heldout_code.py.txt) is never trained on",
        "",
        "## Shape",
        "",
        "```json",
        json.dumps(record["shape"], indent=2),
        "```",
        "",
        "## Training",
        "",
        f"- optimiser: AdamW, betas {tuple(record['settings']['adam_betas'])}, weight decay "
        f"{record['settings']['weight_decay']} (not on norms), peak lr "
        f"{record['settings']['learning_rate']}, {record['settings']['warmup_steps']} warm-up steps, "
        f"cosine to {record['settings']['min_lr_ratio']:.0%}, grad clip {record['settings']['grad_clip']}",
        f"- context {record['settings']['context']} tokens, batch {record['settings']['batch_size']} "
        f"windows ({record['settings']['context'] * record['settings']['batch_size']} tokens/step), "
        f"{record['tokens_seen'] / 1e6:.2f} M tokens seen "
        f"({record['tokens_seen'] / record['corpus_tokens']:.2f} epochs)",
        f"- average throughput {record['tokens_per_second']:.0f} tokens/s on "
        f"{record['threads']} threads (shared machine); training took "
        f"{record['train_seconds'] / 60:.1f} min",
        f"- matmuls in bf16 autocast: {record['settings']['bf16_autocast']} (fp32 master weights)",
        f"- training loss after the run, on one fresh batch: {record['final_train_loss']:.4f}",
        "",
        "## Held-out figures",
        "",
        f"Teacher-forced on {stats['text']}, from the written bf16 files "
        f"loaded into transformers' Qwen3ForCausalLM in fp32, non-overlapping windows of "
        f"{stats['window']} tokens ({stats['positions']} positions):",
        "",
        f"| figure | value |",
        f"|---|---|",
        f"| held-out loss (nats/token) | {stats['heldout_loss']:.4f} |",
        f"| held-out perplexity | {math.exp(stats['heldout_loss']):.2f} |",
        f"| median top-1 probability | {stats['median_top1_prob']:.4f} |",
        f"| fraction of positions with top-2 logit margin >= {PEAKED_MARGIN} | "
        f"{stats['fraction_margin_ge_0p1']:.4f} |",
        "",
    ]
    (out_dir / "TRAINING.md").write_text("\n".join(lines), encoding="utf-8")
    write_json(out_dir / RECORD_NAME, record)


# ------------------------------------------------------------------------------ main


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m tinymodel.train",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--budget-minutes", type=float, default=10.0,
                        help="wall-clock budget for the training loop (sizes the step count)")
    parser.add_argument("--steps", type=int, default=None,
                        help="exact number of steps (overrides the budget; repeats a run)")
    parser.add_argument("--replay", type=Path, default=None,
                        help="a training_record.json: rerun its exact per-step learning rates")
    parser.add_argument("--context", type=int, default=TrainSettings.context)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--intermediate-size", type=int, default=ModelShape.intermediate_size,
                        help="MLP width (shrink only if the budget forces it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heldout", type=Path, default=None,
                        help="held-out text for the figures (default assets/heldout/heldout_code.py.txt)")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="write tokenizer.json and tokenizer_config.json only")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="recompute the held-out figures of an existing checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from qwen3build.paths import HELDOUT_TEXT_PATH

    heldout = args.heldout or HELDOUT_TEXT_PATH
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.evaluate_only:
        report(out_dir, heldout, args.context)
        return 0

    root = stdlib_dir()
    files = corpus_files(root)
    texts = read_corpus(files)
    log.info("corpus: %d files, %.2f MB from %s", len(files), sum(map(len, texts)) / 1e6, root)
    tokenizer = train_tokenizer(texts)
    write_tokenizer_files(tokenizer, out_dir)
    if args.tokenizer_only:
        return 0

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    settings = TrainSettings(seed=args.seed, context=args.context, batch_size=args.batch_size)
    shape = ModelShape(intermediate_size=args.intermediate_size)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)

    # One stream: files in sorted order, each followed by <|endoftext|>.
    stream_ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        stream_ids.extend(encoding.ids)
        stream_ids.append(eos_id)
    stream = torch.tensor(stream_ids, dtype=torch.int16)  # vocab 2048 fits in int16
    log.info("corpus stream: %.2f M tokens (%.2f bytes/token)", stream.numel() / 1e6,
             sum(len(t.encode()) for t in texts) / stream.numel())

    config = qwen3_config_dict(shape, eos_id)
    model = build_model(config)
    log.info("model: %.2f M parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    lr_trace = None
    if args.replay is not None:
        lr_trace = json.loads(args.replay.read_text(encoding="utf-8"))["lr_per_step"]
    steps, seconds, tokens_per_second, lrs = train(model, stream, settings,
                                                   args.budget_minutes * 60, args.steps, lr_trace)
    final_inputs, final_labels = window_batch(stream, settings.context, settings.batch_size,
                                              torch.Generator().manual_seed(settings.seed + 1))
    with torch.no_grad():
        final_loss = torch.nn.functional.cross_entropy(
            model(input_ids=final_inputs).logits.flatten(0, 1), final_labels.flatten()).item()

    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", generation_config_dict(eos_id))
    save_weights(model, out_dir)

    command = "python -m tinymodel.train " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(out_dir / RECORD_NAME, {
        "command": command.strip(),
        "seed": args.seed,
        "steps": steps,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "corpus_files": len(files),
        "corpus_bytes": sum(len(t.encode()) for t in texts),
        "corpus_tokens": int(stream.numel()),
        "corpus_sha256": corpus_digest(root, files, texts),
        "shape": asdict(shape),
        "settings": asdict(settings),
        "tokens_seen": steps * settings.context * settings.batch_size,
        "tokens_per_second": tokens_per_second,
        "train_seconds": seconds,
        "final_train_loss": final_loss,
        "schedule": ("replay" if args.replay is not None
                     else "steps" if args.steps is not None else "wall clock"),
        "lr_per_step": [float(f"{lr:.6g}") for lr in lrs],
    })
    report(out_dir, heldout, settings.context)
    return 0

if __name__ == "__main__":
    sys.exit(main())
