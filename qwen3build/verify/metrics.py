"""Parity metrics between the oracle's logits and a rung's logits, in plain numpy.

All functions are pure: arrays in, arrays or numbers out. Per position (oracle o, rung r,
both (V,) logits of the next token):

- margin: the oracle's top-1 minus top-2 logit. Positions with margin >= KNIFE_EDGE_MARGIN
  are "qualified": only there is the oracle's choice clear enough for top-1 agreement to
  mean anything (a random or undertrained model has flat distributions and near-ties).
- top1: argmax r == argmax o (counted on qualified positions only).
- top5: argmax o is among the rung's 5 largest logits (counted on every position).
- kl: KL(softmax o || softmax r) in nats.
- cosine: cosine between the two logit vectors.
- nll: -log softmax(r)[next token], for perplexity (NaN where the next token is unknown).
"""
from __future__ import annotations

import numpy as np

# An oracle top-2 logit margin below this is a knife-edge tie: a flipped top-1 there, or
# a greedy divergence there, is numerical noise rather than a defect (DESIGN section 4).
KNIFE_EDGE_MARGIN = 0.1
TOP_K = 5
# Elements per float64 working array (32 MB): positions are processed in chunks of
# CHUNK_ELEMENTS // vocab so a 151,936-entry vocabulary does not need gigabytes.
CHUNK_ELEMENTS = 1 << 22


def chunk_positions(vocab_size: int) -> int:
    return max(1, min(512, CHUNK_ELEMENTS // max(1, vocab_size)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """(N, V) -> (N,) top-1 minus top-2 logit."""
    if logits.shape[-1] < 2:
        return np.full(logits.shape[:-1], np.inf)
    top2 = np.partition(logits, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, V), (N,) int with -1 for "no next token" -> (N,) nats (NaN where target < 0)."""
    logp = log_softmax(np.asarray(logits, np.float64))
    out = np.full(len(targets), np.nan)
    has = targets >= 0
    out[has] = -logp[np.nonzero(has)[0], targets[has]]
    return out


def position_metrics(oracle: np.ndarray, rung: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position metrics of one chunk: oracle, rung (N, V) logits; targets (N,) next tokens."""
    o = np.asarray(oracle, np.float64)
    r = np.asarray(rung, np.float64)
    o_top1 = o.argmax(axis=-1)
    k = min(TOP_K, r.shape[-1])
    r_topk = np.argpartition(-r, k - 1, axis=-1)[:, :k]
    with np.errstate(invalid="ignore", over="ignore"):
        logp_o, logp_r = log_softmax(o), log_softmax(r)
        kl = (np.exp(logp_o) * (logp_o - logp_r)).sum(axis=-1)
        cosine = (o * r).sum(axis=-1) / (np.linalg.norm(o, axis=-1) * np.linalg.norm(r, axis=-1))
    finite = np.isfinite(r).all(axis=-1)  # fp16 overflow in a package shows up here
    nll = np.full(len(targets), np.nan)
    has = targets >= 0
    nll[has] = -logp_r[np.nonzero(has)[0], targets[has]]
    return {
        "margin": top2_margin(o),
        "top1": (r.argmax(axis=-1) == o_top1) & finite,
        "top5": (r_topk == o_top1[:, None]).any(axis=-1) & finite,
        "kl": np.where(finite, kl, np.inf),
        "cosine": np.where(finite, cosine, -1.0),
        "nll": nll,
    }


def concat_metrics(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = ("margin", "top1", "top5", "kl", "cosine", "nll", "depth")
    if not parts:
        return {key: np.zeros(0) for key in keys}
    return {key: np.concatenate([p[key] for p in parts]) for key in keys}


def summarize_teacher_forced(m: dict[str, np.ndarray], depth_edges: list[int]) -> dict:
    """Aggregate per-position metrics; top-1 only over positions with margin >= KNIFE_EDGE_MARGIN."""
    def block(sel):
        qualified = sel & (m["margin"] >= KNIFE_EDGE_MARGIN)
        n, q = int(sel.sum()), int(qualified.sum())
        return {
            "positions": n,
            "qualified": q,
            "top1": float(m["top1"][qualified].mean()) if q else None,
            "top1_mismatches": int(q - m["top1"][qualified].sum()),
            "top5": float(m["top5"][sel].mean()) if n else None,
            "mean_kl": float(m["kl"][sel].mean()) if n else None,
            "max_kl": float(m["kl"][sel].max()) if n else None,
            "mean_cosine": float(m["cosine"][sel].mean()) if n else None,
            "min_cosine": float(m["cosine"][sel].min()) if n else None,
        }

    everything = np.ones(len(m["margin"]), bool)
    summary = block(everything)
    summary["max_depth"] = int(m["depth"].max()) if len(m["depth"]) else None
    by_depth = []
    for lo, hi in zip(depth_edges[:-1], depth_edges[1:]):
        sel = (m["depth"] >= lo) & (m["depth"] < hi)
        if sel.any():
            part = block(sel)
            by_depth.append({"from": lo, "to": hi, **{k: part[k] for k in ("positions", "qualified", "top1", "mean_kl")}})
    summary["by_depth"] = by_depth
    return summary


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll))) if len(nll) else float("nan")


def judge_rollout(oracle_tokens: list[int], oracle_margins: list[float], rung_tokens: list[int]) -> dict:
    """Greedy rollout against the oracle's: identical until the first divergence, and a
    divergence passes only at a knife-edge tie (oracle margin < KNIFE_EDGE_MARGIN there).

    rung_tokens may stop at the first token that differs (the rung's prefix was fed the
    oracle's tokens up to there, so later tokens are not comparable anyway)."""
    matched = 0
    for oracle_token, rung_token in zip(oracle_tokens, rung_tokens):
        if oracle_token != rung_token:
            margin = float(oracle_margins[matched])
            return {"matched": matched, "length": len(oracle_tokens), "diverged_at": matched,
                    "oracle_margin": round(margin, 6), "verdict": "knife-edge" if margin < KNIFE_EDGE_MARGIN else "hard"}
        matched += 1
    if matched < len(oracle_tokens):
        raise ValueError(f"rung rollout has {len(rung_tokens)} tokens, oracle {len(oracle_tokens)}, and no divergence")
    return {"matched": matched, "length": len(oracle_tokens), "diverged_at": None, "oracle_margin": None,
            "verdict": "identical"}
