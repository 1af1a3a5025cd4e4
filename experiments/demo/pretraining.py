"""The demo's pretraining rows: what a model that starts from random weights learns before the
cold-start SFT (the paper starts from Qwen2.5-VL, which can already see and reason).

* `caption_items`: one frame and its caption per row (what the object looks like, where it is,
  any effect), the defective frames oversampled;
* `reasoning_segments`: an oracle trace's text without its frames, the syntheses given and the
  rest trained (the format, and reasoning from what the syntheses say);
* `call_items`: rows shaped like the "video" oracle's calls: some frames of one video and the
  verdict on them ("Video 2: smear."), each frame set drawn afresh;
* `call_rows`: the (frames, verdict) of each call of an oracle trace (the probes score these);
* `rehearsal_mix`: SFT rows with fresh call rows among the traces (`mixed_segments` renders
  both), so that SFT keeps what the call phase taught.

Items are {"id", "pair" (index into the training pairs), "frames" (global 1-based frame
numbers), "text"}, for `train.sft.frame_text_dataset`.
"""

from __future__ import annotations

import numpy as np


def oversample(items: list[dict], rare: list[bool], share: float) -> list[dict]:
    """`items` with the rare ones repeated until they make about `share` of the result (the
    defective frames and moments are ~5% of all: a model pretrained on the plain mix learned
    the colours, which every caption names, but its verdicts were always "same")."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"demo: a pretraining share must be in [0, 1), got {share}")
    n_rare = sum(rare)
    if share == 0.0 or n_rare == 0 or n_rare / len(items) >= share:
        return list(items)
    repeats = int(round((share * len(items) - n_rare) / (n_rare * (1.0 - share))))
    return list(items) + [it for it, r in zip(items, rare, strict=True) if r] * repeats


def call_rows(trace: dict) -> list[tuple[list[int], str]]:
    """(frames, synthesis) of each tool call of an oracle trace: the frames the call returned and
    what the next turn's synthesis says about them."""
    from vrthinker_jax.rollout import protocol

    start, end = protocol.SYNTHESIS_TAGS
    turns = trace["turns"]
    out = []
    for i, turn in enumerate(turns):
        if turn.get("role") == "tool" and i + 1 < len(turns):
            text = turns[i + 1]["content"].split(start, 1)[1].split(end, 1)[0]
            out.append(([int(f) for f in turn["frames"]], text))
    return out


def caption_items(pairs: list[dict], captions: list[dict], share: float
                  ) -> tuple[list[dict], dict]:
    """Visual pretraining rows of one frame each: every candidate frame of each training pair
    with its caption, the defective frames oversampled to `share`. Returns (items with "pair" =
    index into pairs, counts)."""
    by_id = {r["id"]: r for r in captions}
    caps, rare = [], []
    for k, r in enumerate(pairs):
        bad = set(_defect(r).get("global_frames", []))
        for g, text in enumerate(by_id[r["id"]]["captions"], start=1):
            caps.append({"id": r["id"], "pair": k, "frames": [g], "text": text})
            rare.append(g in bad)
    items = oversample(caps, rare, share)
    return items, {"caption_rows": len(caps), "defective_frames": sum(rare),
                   "rows_per_epoch": len(items)}


def call_items(pairs: list[dict], num_candidates: int, max_frames: int, rows: int,
               share: float, seed: int) -> tuple[list[dict], dict]:
    """Visual pretraining rows shaped like a "video" oracle call: 1..max_frames frames of one
    video of a training pair, in time order, and the verdict on them ("Video 2: smear." if one
    of them shows the pair's defect, else "Video 2: clean."). `rows` rows, each frame set drawn
    afresh (so that no row can be learned by heart: the oracle's own calls, the same 9 frames
    of each pair, were, and held-out calls were read 100% "clean"); `share` of them hold a
    defective frame. Returns (items with "pair" = index into pairs, counts)."""
    from data_pipelines import synthetic

    if not 0.0 <= share <= 1.0:
        raise ValueError(f"demo: pretrain.call_defect_share must be in [0, 1], got {share}")
    n = int(num_candidates)
    rng = np.random.default_rng([int(seed), 7])
    defective = [k for k, r in enumerate(pairs) if _defect(r).get("candidates")]
    if share > 0 and not defective:
        raise ValueError("demo: no training pair has a defect to pretrain the calls on")
    items = []
    for _ in range(int(rows)):
        size = int(rng.integers(1, int(max_frames) + 1))
        if rng.uniform() < share:
            k = defective[int(rng.integers(len(defective)))]
            d = _defect(pairs[k])
            video, bad = int(d["video"]), [int(c) for c in d["candidates"]]
            must = [bad[int(rng.integers(len(bad)))]]
            rest = [c for c in range(1, n + 1) if c not in must]
            kind = d["kind"]
        else:
            k = int(rng.integers(len(pairs)))
            video = int(rng.integers(1, 3))
            d = _defect(pairs[k])
            skip = set(d.get("candidates", [])) if d.get("video") == video else set()
            must, rest, kind = [], [c for c in range(1, n + 1) if c not in skip], None
        more = rng.choice(rest, size=min(size - len(must), len(rest)), replace=False)
        cands = sorted(must + [int(c) for c in more])
        items.append({"id": pairs[k]["id"], "pair": k,
                      "frames": [(video - 1) * n + c for c in cands],
                      "text": synthetic.video_verdict(video, kind)})
    bad_rows = sum(not it["text"].endswith("clean.") for it in items)
    return items, {"call_rows": len(items), "defective_calls": bad_rows}


def reasoning_segments(trace: dict, pcfg) -> list:
    """An oracle trace's text without its frames, for pretraining the text model to reason from
    what the syntheses say: each synthesis (what the frames showed, unknowable without them) is
    context, the rest of each assistant turn is trained (recommendations, tool calls, the final
    think and answer)."""
    from vrthinker_jax.rollout import protocol

    out = []
    for seg in protocol.trace_segments(trace, pcfg):
        if isinstance(seg, protocol.Frame):
            continue
        end = protocol.SYNTHESIS_TAGS[1]
        if isinstance(seg, protocol.Text) and seg.trainable and end in seg.text:
            head, tail = seg.text.split(end, 1)
            out += [protocol.Text(head + end), protocol.Text(tail, trainable=True)]
        else:
            out.append(seg)
    return out


def rehearsal_mix(traces: list[dict], trace_banks: list, calls: list[dict], call_banks: list,
                  rows: int, seed: int) -> tuple[list[dict], list]:
    """`rows` SFT rows: every call item once and the traces cycled to fill the rest, in a seeded
    random order (records, banks). Without them SFT forgot defects the call phase had taught:
    with seed 1, a call phase that found every held-out smear left an SFT model that reported
    none."""
    if len(calls) >= rows:
        raise ValueError(f"demo: {len(calls)} rehearsal call rows leave no room for traces in "
                         f"{rows} SFT rows (lower sft.call_share)")
    if not traces:
        raise ValueError("demo: no traces to train on")
    fill = rows - len(calls)
    records = [traces[i % len(traces)] for i in range(fill)] + list(calls)
    banks = [trace_banks[i % len(traces)] for i in range(fill)] + list(call_banks)
    order = np.random.default_rng([int(seed), 11]).permutation(rows)
    return [records[i] for i in order], [banks[i] for i in order]


def mixed_segments(record: dict, pcfg) -> list:
    """Segments of a `rehearsal_mix` row: a call item (it has "text") or an oracle trace."""
    from vrthinker_jax.rollout import protocol

    if "text" in record:
        return protocol.caption_segments([int(f) for f in record["frames"]], record["text"])
    return protocol.trace_segments(record, pcfg)


def _defect(pair: dict) -> dict:
    """A manifest row's defect metadata ({} for a pair without one)."""
    return (pair.get("meta") or {}).get("defect") or {}
