"""The oracle: transformers' Qwen3ForCausalLM in fp32 on the checkpoint's own safetensors.

Written by nobody here, so it is the independent reference the ladder is measured from.
transformers is a dependency of verify and the tests, never of the build: it is imported
here, inside functions, only when verify runs. Remote code is never trusted.
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import BuildError
from .metrics import chunk_positions, token_nll, top2_margin

log = logging.getLogger(__name__)

STANDARD_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json")


def _quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


class Oracle:
    """fp32 HF model over the plan's checkpoint files.

    Loaded with from_pretrained when the weights sit beside config.json under the standard
    names; otherwise (WEIGHTS / WEIGHTS_GLOB / WEIGHTS_INDEX elsewhere) the same class is
    built from config.json and given the files' tensors, refusing missing or extra ones."""

    def __init__(self, plan):
        try:
            import torch
            transformers = _quiet_transformers()
        except ImportError as exc:
            raise BuildError(f"verify needs transformers (the oracle): install the 'verify' extra ({exc})") from None
        self.torch = torch
        settings = plan.settings
        config_dir = settings.CONFIG.parent
        standard = (settings.CONFIG.name == "config.json"
                    and all(f.parent == config_dir for f in plan.weight_files)
                    and (plan.weight_index is None or plan.weight_index.name == STANDARD_WEIGHT_NAMES[1])
                    and (plan.weight_index is not None or [f.name for f in plan.weight_files] == [STANDARD_WEIGHT_NAMES[0]]))
        try:
            if standard:
                model = transformers.Qwen3ForCausalLM.from_pretrained(
                    str(config_dir), dtype=torch.float32, use_safetensors=True, trust_remote_code=False,
                    local_files_only=True)
            else:
                model = self._from_files(transformers, plan)
        except BuildError:
            raise
        except Exception as exc:  # transformers raises many types; the user needs one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BuildError(f"oracle: transformers cannot load {config_dir} as Qwen3ForCausalLM: {first}") from None
        self.model = model.float().eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.chunk = chunk_positions(self.vocab_size)
        self.released = False  # release_decoder() was called: only the head is left
        log.info("oracle: transformers %s Qwen3ForCausalLM fp32 (%s)", transformers.__version__,
                 "from_pretrained" if standard else "config.json + safetensors files")

    def _from_files(self, transformers, plan):
        from safetensors.torch import load_file
        torch = self.torch
        config = transformers.Qwen3Config.from_json_file(str(plan.settings.CONFIG))
        model = transformers.Qwen3ForCausalLM(config).to(torch.float32)
        state = {}
        for path in plan.weight_files:
            state.update({name: tensor.float() for name, tensor in load_file(str(path)).items()})
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or result.unexpected_keys:
            raise BuildError(f"oracle: checkpoint tensors do not match Qwen3ForCausalLM (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
        if config.tie_word_embeddings:
            model.tie_weights()
        return model

    # ---------------------------------------------------------------- teacher-forced
    def hidden_states(self, tokens: np.ndarray):
        """tokens (L,) -> final-normed hidden states (L, H) fp32 torch, one forward pass."""
        assert not self.released, "the oracle's decoder was released"
        torch = self.torch
        with torch.no_grad():
            ids = torch.as_tensor(np.asarray(tokens, np.int64))[None]
            return self.model.model(input_ids=ids).last_hidden_state[0]

    def logits(self, hidden) -> np.ndarray:
        """(N, H) hidden states -> (N, V) float32 logits."""
        with self.torch.no_grad():
            return self.model.lm_head(hidden).numpy()

    def release_decoder(self) -> None:
        """Free the decoder layers once every run's hidden states and every rollout are
        computed: the rungs then need only `logits` (the head). At the 1.7B shape that is
        5.6 GB of fp32 that would otherwise sit beside each rung's own copy."""
        import gc
        self.model.model.layers = self.torch.nn.ModuleList()
        self.released = True
        gc.collect()

    def run_nll(self, hidden, tokens: np.ndarray) -> np.ndarray:
        """Next-token NLL at every position of a run (NaN at the last one)."""
        targets = np.append(np.asarray(tokens[1:], np.int64), -1)
        parts = [token_nll(self.logits(hidden[i:i + self.chunk]), targets[i:i + self.chunk])
                 for i in range(0, len(tokens), self.chunk)]
        return np.concatenate(parts)

    # ---------------------------------------------------------------- greedy
    def greedy(self, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy continuation with HF's KV cache: the tokens and the oracle margin at each step."""
        assert not self.released, "the oracle's decoder was released"
        torch = self.torch
        tokens, margins = [], []
        with torch.no_grad():
            out = self.model(input_ids=torch.as_tensor(np.asarray(prompt, np.int64))[None], use_cache=True)
            for step in range(new_tokens):
                logits = out.logits[0, -1].numpy()
                token = int(logits.argmax())
                tokens.append(token)
                margins.append(float(top2_margin(logits[None])[0]))
                if step + 1 < new_tokens:
                    out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values,
                                     use_cache=True)
        return tokens, margins
