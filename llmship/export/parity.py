"""Parity of a candidate engine (ORT, any variant) against a reference (PyTorch) on a few prompts.

Checks, each reported as figures:
- prefill: every prompt alone, logits at every position;
- decode: `decode_steps` steps fed the reference's greedy tokens, each engine on its own cache;
- batch: all prompts as one left-padded batch (the candidate's padded rows vs the reference's unpadded rows);
  (top-1 agreement of these three counts an argmax disagreement within `tie_gap_floor` logits as agreement: a tie)
- greedy (tie-aware, gated): the reference's greedy run of `greedy_tokens` is fed to the candidate step by step; where
  the candidate's argmax differs, the two tokens' logits decide: when the reference's preference for its token and
  the candidate's for its own are both within the tie tolerance (see `tie_tolerance`), the step is a tie (recorded,
  and both continue on the reference's token); otherwise the prompt diverged there and its matched length ends;
- greedy (raw, reported): both generate `greedy_tokens` freely (batched, EOS ignored), matched as a common prefix;
- NLL: mean negative log-likelihood of the prompts under both (relative increase catches collapse).

The prompts are sampled from the reference model itself (`model_prompts`): text where the model is at home, whatever
it was trained on, with no data file needed. Fixed text the model never saw puts it in unnatural states; its
argmax there is arbitrary and near-ties are frequent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmship.config import EMBEDDED, SAMPLES_DIR, ParityConfig
from llmship.runtime.base import Engine, left_pad, log_softmax

# Built-in prompts in the formats llmship serves (plain zh/en text, C-Eval question, alpaca instruction),
# used when the bundled samples are absent.
BUILTIN_PROMPTS = (
    "The capital of France is Paris. The capital of Germany is",
    "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n问题：TCP协议工作在哪一层？\nA. 应用层\nB. 传输层\n答案：",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n",
    "今天天气很好，我们去公园散步，",
)
MAX_PROMPT_TOKENS = 48


def _sample_texts() -> list[str]:
    """One text per bundled sample set, in the format llmship feeds it (C-Eval GEN prompt, alpaca prompt, C4 text,
    ShareGPT first turn); empty when the samples (or their readers) are absent."""
    if not SAMPLES_DIR.is_dir():
        return []
    try:
        from llmship.data import sources, templates
    except ImportError:
        return []
    readers = (
        lambda: _ceval_prompt(sources.read_ceval(EMBEDDED), templates),
        lambda: templates.alpaca_prompt(sources.read_alpaca(EMBEDDED)[0]),
        lambda: sources.read_c4(EMBEDDED)[0],
        lambda: sources.read_sharegpt(EMBEDDED)[0]["conversations"][0]["value"],
    )
    texts = []
    for read in readers:
        try:
            text = read()
        except Exception:  # noqa: BLE001 - a missing or odd sample set just falls back to the built-in prompts
            continue
        if isinstance(text, str) and text.strip():
            texts.append(text)
    return texts


def _ceval_prompt(data: Any, templates: Any) -> str:
    subject = next(s for s in data.subjects.values() if s.val)
    return templates.ceval_gen_prompt(subject.name_zh, [], subject.val[0])


def default_prompts(tokenizer: Any, max_positions: int, count: int = 4) -> list[list[int]]:
    """Token ids of a few real-format prompts of different lengths (samples when bundled, else built-in)."""
    texts = _sample_texts()
    texts += [t for t in BUILTIN_PROMPTS if t not in texts]
    prompts = []
    for text, keep in zip(texts[:count], prompt_lengths(max_positions, count), strict=False):
        ids = list(tokenizer(text)["input_ids"])
        prompts.append(ids[:keep] if len(ids) > keep else ids)
    return [p for p in prompts if len(p) >= 2]


# Model-sampled parity prompts: the seed of the first prompt (prompt i uses PROMPT_SEED + i), and the temperature.
# Sampling at temperature 1 draws text from the model's own distribution (what it assigns its likelihood to).
PROMPT_SEED = 0
PROMPT_TEMPERATURE = 1.0
PROMPT_SOURCE_WHY = ("sampled from the reference model (seeded): text where the model is at home, whatever data it was "
                     "trained on; fixed text it never saw puts it where its argmax is arbitrary and near-ties are common")


# What the manifest says of the prompts when `parity.prompts: samples`.
SAMPLES_SOURCE = {"source": "samples",
                  "why": "bundled sample texts in the formats llmship serves (parity.prompts: samples)"}


def prompt_lengths(max_positions: int, count: int) -> list[int]:
    """Different lengths, so the batch check really pads."""
    limit = max(2, min(MAX_PROMPT_TOKENS, max_positions // 2))
    return [max(2, limit - 5 * i) for i in range(count)]


def model_prompts(reference: Engine, start: Sequence[int], max_positions: int, count: int = 4,
                  seed: int = PROMPT_SEED) -> list[list[int]]:
    """`count` prompts sampled from the reference after `start` (BOS), each from its own seeded generator; EOS is never
    drawn, so every prompt has its full length. The same reference and seed give the same prompts for every variant.
    All prompts grow in one batch (each row draws from its own generator, then is cut at its length), so a reference
    that reads its weights on every forward (the layer-at-a-time one) makes them in longest - 1 passes, not in the sum
    of their lengths; a row's first tokens do not depend on how long the batch runs."""
    lengths = prompt_lengths(max_positions, count)
    generators = [np.random.default_rng(seed + index) for index in range(count)]
    rows = [list(start) for _ in range(count)]
    logits, cache = reference.prefill(*left_pad(rows, reference.pad_token_id))
    step = logits[:, -1]
    del logits
    while len(rows[0]) < max(lengths):
        tokens = [_sample(step[row], rng, reference.eos_token_id) for row, rng in enumerate(generators)]
        for row, token in zip(rows, tokens, strict=True):
            row.append(token)
        if len(rows[0]) < max(lengths):
            step, cache = reference.decode(np.array(tokens, dtype=np.int64), cache)
    return [row[:length] for row, length in zip(rows, lengths, strict=True)]


def _sample(logits: np.ndarray, rng: np.random.Generator, eos: int | None) -> int:
    scaled = logits.astype(np.float64) / PROMPT_TEMPERATURE
    if eos is not None and 0 <= eos < len(scaled):
        scaled[eos] = -np.inf
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def parity_prompts(reference: Engine, tokenizer: Any, parity: ParityConfig) -> tuple[list[list[int]], dict[str, Any]]:
    """The prompts `parity.prompts` asks for, and what the manifest says about them (which source, and why)."""
    if parity.prompts == "samples":
        return default_prompts(tokenizer, reference.max_positions), dict(SAMPLES_SOURCE)
    start = list(tokenizer("")["input_ids"])[:1] or list(tokenizer("The")["input_ids"])[:1]
    key = (tuple(start), reference.max_positions)
    cached = getattr(reference, "_parity_prompts", None)
    if cached is None or cached[0] != key:  # every variant of a run is checked on the same prompts
        cached = (key, model_prompts(reference, start, reference.max_positions))
        reference._parity_prompts = cached
    prompts = [list(p) for p in cached[1]]
    return prompts, {"source": "model", "seed": PROMPT_SEED, "temperature": PROMPT_TEMPERATURE, "start": start,
                     "why": PROMPT_SOURCE_WHY}


def _compare(ref: np.ndarray, cand: np.ndarray) -> tuple[float, int, int, list[float]]:
    """(max abs diff, agreeing argmax positions, positions, the tie gap of each disagreeing position) of two (..., V)
    logit arrays. A disagreement's tie gap is the larger of the reference's preference for its token over the
    candidate's and the candidate's the other way."""
    ref2 = ref.reshape(-1, ref.shape[-1])
    cand2 = cand.reshape(-1, cand.shape[-1])
    diff = float(np.max(np.abs(ref2.astype(np.float64) - cand2.astype(np.float64)))) if ref2.size else 0.0
    ref_top, cand_top = ref2.argmax(-1), cand2.argmax(-1)
    rows = np.flatnonzero(ref_top != cand_top)
    gaps = [max(float(ref2[r, ref_top[r]] - ref2[r, cand_top[r]]), float(cand2[r, cand_top[r]] - cand2[r, ref_top[r]]))
            for r in rows]
    return diff, len(ref2) - len(rows), len(ref2), gaps


class _Tally:
    def __init__(self) -> None:
        self.scale = 0.0
        self.diff = 0.0
        self.agree = 0
        self.total = 0
        self.square_error = 0.0  # of the logit differences centred per position (a shift per position moves no argmax)
        self.values = 0
        self.gaps: list[float] = []  # tie gap of every position whose argmax differs

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        diff, agree, total, gaps = _compare(ref, cand)
        self.gaps += gaps
        if not np.isfinite(diff):
            diff = float("inf")
        self.diff = max(self.diff, diff)
        self.scale = max(self.scale, float(np.max(np.abs(ref))) if ref.size else 0.0)
        self.agree += agree
        self.total += total
        delta = (cand.astype(np.float64) - ref.astype(np.float64)).reshape(-1, ref.shape[-1])
        centred = delta - delta.mean(axis=-1, keepdims=True)
        self.square_error += float(np.square(centred).sum()) if np.isfinite(centred).all() else float("inf")
        self.values += centred.size

    def top1(self, tolerance: float) -> float:
        """Share of positions whose argmax agrees, a disagreement within the tie tolerance counting as agreement."""
        ties = sum(gap <= tolerance for gap in self.gaps)
        return (self.agree + ties) / self.total if self.total else 1.0

    def figures(self, prefix: str, tolerance: float) -> dict[str, Any]:
        return {f"{prefix}_max_diff": self.diff, f"{prefix}_top1": self.top1(tolerance),
                f"{prefix}_top1_raw": self.agree / self.total if self.total else 1.0,
                f"{prefix}_top1_ties": sum(gap <= tolerance for gap in self.gaps)}


# A greedy divergence is a tie when the reference's gap between its token and the candidate's (and the candidate's
# gap the other way) is within TIE_NOISE_SIGMAS standard deviations of the logit noise measured teacher-forced on the
# same prompts: the gap is moved by the difference of two logits' errors, whose standard deviation is sqrt(2) sigma,
# so 4 sigma is about 2.8 of those (a flip this close happens by noise alone).
TIE_NOISE_SIGMAS = 4.0


def tie_tolerance(parity: ParityConfig, tallies: Sequence[_Tally]) -> tuple[float, float]:
    """(tie tolerance, measured logit noise sigma). The tolerance is the larger of `parity.tie_gap_floor` and
    TIE_NOISE_SIGMAS x sigma, capped at `parity.max_logits_diff` (noise beyond the scheme's bound is a fault, not a
    tie); `parity.tie_gap` set fixes it instead."""
    values = sum(t.values for t in tallies)
    sigma = float(np.sqrt(sum(t.square_error for t in tallies) / values)) if values else 0.0
    if parity.tie_gap is not None:
        return parity.tie_gap, sigma
    measured = TIE_NOISE_SIGMAS * sigma if np.isfinite(sigma) else float("inf")
    return float(min(max(parity.tie_gap_floor, measured), parity.max_logits_diff)), sigma


def tie_aware_greedy(step_logits: Sequence[np.ndarray], ref_tokens: np.ndarray, ref_logits: np.ndarray,
                     tolerance: float) -> dict[str, Any]:
    """Compare the candidate's argmax with the reference's greedy token at each step: {matched, ties, verdict}.
    `step_logits[p]`: the candidate's logits at step p, fed the reference's tokens before it (its own cache).
    `matched` counts the steps before the first divergence that is not a tie (all of them when there is none)."""
    ties: list[dict[str, Any]] = []
    for position, (ref_token, logits) in enumerate(zip((int(t) for t in ref_tokens), step_logits, strict=False)):
        cand_token = int(logits.argmax())
        if cand_token != ref_token:
            ref_gap = float(ref_logits[position][ref_token] - ref_logits[position][cand_token])
            cand_gap = float(logits[cand_token] - logits[ref_token])
            record = {"position": position, "reference_token": ref_token, "candidate_token": cand_token,
                      "reference_gap": ref_gap, "candidate_gap": cand_gap}
            if not (ref_gap <= tolerance and cand_gap <= tolerance):
                return {"matched": position, "ties": ties, "verdict": "diverged", "divergence": record}
            ties.append(record)
    return {"matched": len(ref_tokens), "ties": ties, "verdict": "match with ties" if ties else "match"}


def fed_tokens(ref: ReferenceTrace, row: int) -> np.ndarray:
    """The reference's tokens fed to the candidate after prompt `row`, one run serving both checks: the decode check
    reads the logits after its first decode_steps, the greedy check those after all but the last greedy token. Both
    are prefixes of the reference's one greedy path."""
    decode, path = np.asarray(ref.decode_tokens[row]), np.asarray(ref.path_tokens[row])
    longer, shorter = (decode, path) if len(decode) >= len(path) else (path, decode)
    if not np.array_equal(longer[: len(shorter)], shorter):
        raise ValueError("the reference trace's decode and greedy tokens are not one path")
    return longer[: max(len(decode), len(path) - 1, 0)]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _batch_nll(logits: Sequence[np.ndarray], prompts: Sequence[Sequence[int]]) -> float:
    """Mean NLL of the prompts' tokens from their (len, V) logits (the `score` of an engine)."""
    scores = [log_softmax(rows[:-1].astype(np.float64))[np.arange(len(p) - 1), np.asarray(p[1:], dtype=np.int64)]
              for rows, p in zip(logits, prompts, strict=True)]
    return float(-np.concatenate(scores).mean())


@dataclass
class ReferenceTrace:
    """What the reference computes for a parity check; kept on the engine, since every variant compares against it."""

    prefill: list[np.ndarray]          # (len, V) logits of each prompt alone
    decode_tokens: list[np.ndarray]    # (steps,) tokens fed after each prompt (the reference's greedy choice)
    decode_logits: list[np.ndarray]    # (steps, V) logits of those steps
    greedy: list[list[int]]            # the raw batched greedy run (for the common-prefix figure)
    nll: float
    path_tokens: list[np.ndarray]      # (n,) the reference's greedy tokens of each prompt alone, cache-fed
    path_logits: list[np.ndarray]      # (n, V) the logits each of them was chosen from
    info: dict[str, Any] = field(default_factory=dict)  # the reference engine's `info()`


def reference_trace(reference: Engine, parity: ParityConfig, prompts: list[list[int]]) -> ReferenceTrace:
    key = (tuple(tuple(p) for p in prompts), parity.decode_steps, parity.greedy_tokens)
    cached = getattr(reference, "_parity_trace", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    prefill, tokens, steps, path_tokens, path_logits = [], [], [], [], []
    length = max(parity.decode_steps, parity.greedy_tokens)
    for prompt in prompts:
        logits, cache = reference.prefill(*left_pad([prompt], reference.pad_token_id))
        prefill.append(logits[0])
        # One cache-fed greedy run serves both the decode check (its first decode_steps) and the tie-aware greedy.
        step, fed, chosen_from, seen = logits[:, -1], [], [], []
        for _ in range(length):
            token = step.argmax(-1).astype(np.int64)
            chosen_from.append(step[0])
            step, cache = reference.decode(token, cache)
            fed.append(int(token[0]))
            seen.append(step[0])
        empty = np.zeros((0, logits.shape[-1]), np.float32)
        tokens.append(np.array(fed[: parity.decode_steps], dtype=np.int64))
        steps.append(np.stack(seen[: parity.decode_steps]) if parity.decode_steps else empty)
        path_tokens.append(np.array(fed[: parity.greedy_tokens], dtype=np.int64))
        path_logits.append(np.stack(chosen_from[: parity.greedy_tokens]) if parity.greedy_tokens else empty)
    greedy = reference.generate(prompts, parity.greedy_tokens, ignore_eos=True) if parity.greedy_tokens > 0 else []
    trace = ReferenceTrace(prefill, tokens, steps, greedy, _batch_nll(reference.logits(prompts, batch_size=len(prompts)),
                                                                       prompts), path_tokens, path_logits,
                           reference.info())
    reference._parity_trace = (key, trace)  # one trace per engine: the variants of a run share their prompts
    return trace


def batched_reference_trace(reference: Engine, parity: ParityConfig, prompts: list[list[int]]) -> ReferenceTrace:
    """The reference's side of a parity check from one left-padded batch of the prompts: a prefill, then the batch's
    greedy decode, all prompts in the same forward passes. For a reference that reads its weights again on every
    forward (the layer-at-a-time reference of a streamed checkpoint: one pass over the checkpoint each), that is
    max(decode_steps, greedy_tokens) passes, where `reference_trace` runs each prompt alone (4 x 33 + 34 at the
    defaults). A prompt's rows in the padded batch agree with the prompt run alone to float rounding; its greedy path
    is the batch's, so the raw greedy run is the same path."""
    ids, mask = left_pad(prompts, reference.pad_token_id)
    logits, cache = reference.prefill(ids, mask)
    width = ids.shape[1]
    prefill = [np.ascontiguousarray(logits[row, width - len(prompt):]) for row, prompt in enumerate(prompts)]
    del logits
    length = max(parity.decode_steps, parity.greedy_tokens)
    step = np.stack([rows[-1] for rows in prefill])
    fed, chosen_from, seen = [], [], []
    for index in range(length):
        token = step.argmax(-1).astype(np.int64)
        fed.append(token)
        chosen_from.append(step)
        # the logits after feeding a token serve the decode check, and choose the next greedy token
        if index < parity.decode_steps or index + 1 < parity.greedy_tokens:
            step, cache = reference.decode(token, cache)
            seen.append(step)
    vocab = prefill[0].shape[-1]

    def per_row(arrays: list[np.ndarray], row: int, count: int) -> np.ndarray:
        return np.stack([a[row] for a in arrays[:count]]) if count else np.zeros((0, vocab), np.float32)

    rows = range(len(prompts))
    tokens = [np.array([int(t[row]) for t in fed[: parity.decode_steps]], dtype=np.int64) for row in rows]
    path = [np.array([int(t[row]) for t in fed[: parity.greedy_tokens]], dtype=np.int64) for row in rows]
    return ReferenceTrace(prefill, tokens, [per_row(seen, row, parity.decode_steps) for row in rows],
                          [list(map(int, t)) for t in path], _batch_nll(prefill, prompts), path,
                          [per_row(chosen_from, row, parity.greedy_tokens) for row in rows], reference.info())


def save_trace(path: Any, trace: ReferenceTrace) -> None:
    """The trace as one .npz (atomic), for the variants compiled by later processes."""
    import io
    import json

    from llmship.files import write_atomic

    arrays: dict[str, np.ndarray] = {}
    for name in ("prefill", "decode_tokens", "decode_logits", "path_tokens", "path_logits"):
        for row, value in enumerate(getattr(trace, name)):
            arrays[f"{name}.{row}"] = value
    meta = {"rows": len(trace.prefill), "greedy": trace.greedy, "nll": trace.nll, "info": trace.info}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def load_trace(path: Any) -> ReferenceTrace:
    import json

    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        fields = {name: [data[f"{name}.{row}"] for row in range(meta["rows"])]
                  for name in ("prefill", "decode_tokens", "decode_logits", "path_tokens", "path_logits")}
    return ReferenceTrace(fields["prefill"], fields["decode_tokens"], fields["decode_logits"], meta["greedy"],
                          meta["nll"], fields["path_tokens"], fields["path_logits"], meta["info"])


def check_parity(reference: Engine | None, candidate: Engine, parity: ParityConfig, prompts: Sequence[Sequence[int]],
                 trace: ReferenceTrace | None = None) -> dict[str, Any]:
    """Figures of candidate vs reference (see the module doc); compare with `parity_failures`. `trace`: the
    reference's side computed before (then `reference` is not used)."""
    prompts = [list(p) for p in prompts if len(p) >= 2]
    if not prompts:
        raise ValueError("parity needs at least one prompt of two or more tokens")
    ref = trace if trace is not None else reference_trace(reference, parity, prompts)
    fed = [fed_tokens(ref, row) for row in range(len(prompts))]
    solo, batched = candidate.forced_runs(prompts, fed)
    prefill, decode, batch = _Tally(), _Tally(), _Tally()
    for row, (cand_prefill, cand_steps) in enumerate(solo):
        prefill.add(ref.prefill[row], cand_prefill)
        # the same tokens as the reference got, fed into the candidate's own cache
        for step in range(len(ref.decode_tokens[row])):
            decode.add(ref.decode_logits[row][step], cand_steps[step])
        batch.add(ref.prefill[row], batched[row])

    tolerance, noise = tie_tolerance(parity, [prefill, decode, batch])
    # Teacher-forced top-1 forgives only ties within the fixed floor (exact or near-exact ties): a tolerance scaled by
    # the candidate's own noise would let a noisy candidate excuse its own flips there.
    top1_tolerance = parity.tie_gap if parity.tie_gap is not None else parity.tie_gap_floor
    greedy: dict[str, Any] = {"greedy_tokens": parity.greedy_tokens, "greedy_match": 1.0, "greedy_raw_match": 1.0}
    if parity.greedy_tokens > 0:
        paths = [[cand_prefill[-1], *cand_steps] for cand_prefill, cand_steps in solo]
        per_prompt = [tie_aware_greedy(path, ref.path_tokens[row], ref.path_logits[row], tolerance)
                      for row, path in enumerate(paths)]
        if candidate.steps_freely:
            cand_out = candidate.generate(prompts, parity.greedy_tokens, ignore_eos=True)
            raw = [_common_prefix(r, c) for r, c in zip(ref.greedy, cand_out, strict=True)]
        else:  # its free run follows the fed path up to the first token it chooses differently
            raw = [_common_prefix(r, [int(step.argmax()) for step in path[: parity.greedy_tokens]])
                   for r, path in zip(ref.greedy, paths, strict=True)]
        for record, raw_matched in zip(per_prompt, raw, strict=True):
            record["raw_common_prefix"] = raw_matched
        greedy = {"greedy_tokens": parity.greedy_tokens,
                  "greedy_match": min(r["matched"] for r in per_prompt) / parity.greedy_tokens,
                  "greedy_ties": sum(len(r["ties"]) for r in per_prompt),
                  "greedy_prompts": per_prompt,
                  "greedy_raw_match": min(m / max(len(r), 1) for m, r in zip(raw, ref.greedy, strict=True)),
                  "greedy_matched_tokens": raw,
                  "greedy_raw_run": "free-running batch" if candidate.steps_freely
                  else "teacher-forced, each prompt alone"}

    nll_ref = ref.nll
    nll_cand = _batch_nll(batched, prompts)
    figures: dict[str, Any] = {
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "max_logits_diff": max(prefill.diff, decode.diff, batch.diff),
        # Largest |reference logit|: puts the absolute diff in scale (fp32 kernels differ by ~1e-7 of it).
        "logits_scale": max(prefill.scale, decode.scale, batch.scale),
        "top1_agreement": min(t.top1(top1_tolerance) for t in (prefill, decode, batch)),
        "top1_tie_tolerance": top1_tolerance,
        "tie_tolerance": tolerance,
        "logit_noise": noise,
        **prefill.figures("prefill", top1_tolerance), **decode.figures("decode", top1_tolerance),
        **batch.figures("batch", top1_tolerance),
        **greedy,
        "nll_reference": nll_ref,
        "nll_candidate": nll_cand,
        "nll_increase": (nll_cand - nll_ref) / abs(nll_ref) if nll_ref else float(nll_cand - nll_ref),
        "reference": ref.info,
        "candidate": candidate.info(),
    }
    return figures


def parity_failures(figures: dict[str, Any], parity: ParityConfig) -> list[str]:
    """One line per tolerance the figures exceed (empty when parity holds)."""
    failures = []
    diff = figures["max_logits_diff"]
    if not np.isfinite(diff) or diff > parity.max_logits_diff:
        failures.append(f"max |logits diff| {diff:.3g} > {parity.max_logits_diff:g} "
                        f"(prefill {figures['prefill_max_diff']:.3g}, decode {figures['decode_max_diff']:.3g}, "
                        f"batch {figures['batch_max_diff']:.3g})")
    if figures["top1_agreement"] < parity.min_top1_agreement:
        failures.append(f"top-1 agreement {figures['top1_agreement']:.4f} < {parity.min_top1_agreement:g} "
                        f"(prefill {figures['prefill_top1']:.4f}, decode {figures['decode_top1']:.4f}, "
                        f"batch {figures['batch_top1']:.4f})")
    if figures["greedy_match"] < parity.min_greedy_match:
        diverged = [p["divergence"] for p in figures.get("greedy_prompts", []) if p["verdict"] == "diverged"]
        where = "".join(f"; diverged at token {d['position']}: reference gap {d['reference_gap']:.3g}, candidate gap "
                        f"{d['candidate_gap']:.3g}, tie tolerance {figures['tie_tolerance']:.3g}"
                        for d in diverged[:1])
        failures.append(f"greedy tokens match {figures['greedy_match']:.3f} of {figures['greedy_tokens']} "
                        f"< {parity.min_greedy_match:g} (tie-aware){where}")
    if not np.isfinite(figures["nll_candidate"]) or figures["nll_increase"] > parity.max_nll_increase:
        failures.append(f"NLL increase {figures['nll_increase']:.2%} > {parity.max_nll_increase:.2%} "
                        f"({figures['nll_reference']:.4f} -> {figures['nll_candidate']:.4f})")
    return failures
