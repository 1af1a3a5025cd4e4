"""The main job's embedded default (`python -m experiments.demo`): sizes chosen for 2 CPU cores.

`get_config("default")` targets < 30 min on 2 CPU cores, `get_config("quick")` < 3 min (the test
suite's end-to-end check: same code path, far too small to learn the task). `get_config("stage3")`
is the default with a short SFT, which leaves the policy room to improve, and a longer GRPO with
8 rollouts per prompt (`STAGE3`; experiments/benchmarks/stage3_bench.py runs it per seed from a
shared pretraining).

The stages reuse the stage configs (`experiments/configs/{sft,rft,grpo}.py` at size `tiny`); this
file only says what the demo changes in them (`stage_overrides`).
"""

from __future__ import annotations

import ml_collections

from vrthinker_jax.models import config as model_config

PRESETS = ("default", "quick", "stage3")
SYSTEM_PROMPT = (
    "Compare video 1 and video 2 for the prompt on TA, MQ, VQ and OA. Call select_frames to see "
    "more frames. Answer 1, 2, or 0 for a tie."
)


def _model(hidden: int, layers: int, heads: int, kv_heads: int, vocab: int, vision_hidden: int,
           vision_depth: int) -> ml_collections.ConfigDict:
    """The tiny Qwen2.5-VL with the demo's widths (random init; vision ids set from the
    tokenizer by `runtime.align_model_config`)."""
    m = model_config.get_config("tiny")
    t = m.text
    t.hidden_size = hidden
    t.num_hidden_layers = layers
    t.num_attention_heads = heads
    t.num_key_value_heads = kv_heads
    t.head_dim = hidden // heads
    t.intermediate_size = 2 * hidden
    t.vocab_size = vocab
    half = t.head_dim // 2  # M-RoPE (t, h, w) sections sum to head_dim / 2
    t.mrope_section = (half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8)
    v = m.vision
    v.hidden_size = vision_hidden
    v.num_heads = 2
    v.intermediate_size = 2 * vision_hidden
    v.depth = vision_depth
    v.fullatt_block_indexes = (vision_depth - 1,)
    v.out_hidden_size = hidden
    return m


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"demo config: unknown preset {preset!r}; expected one of {PRESETS}")
    quick = preset == "quick"
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0  # data, model init and sampling seed
    # the job's goal: the final model beats the initial-frames baseline by this many held-out
    # points, both in OA diff and in OA with ties (results.json `gain.goal_met`)
    c.goal_points = 20.0

    # ---- synthetic needle data (data_pipelines/synthetic.py)
    c.num_pairs = 24 if quick else 400  # pairs generated; heldout_fraction of them held out
    c.synthetic = ml_collections.ConfigDict(dict(
        heldout_fraction=0.25 if quick else 0.2,  # share of pairs never trained on
        size=112,  # rendered frame side (px): the bank frame, no resampling
        frames=32,  # frames per video
        # the moving shape's side (px): 2 x 2 of a frame's 4 x 4 visual tokens. At 28 px (one
        # token) the tiny model did not learn colour defects in 400 steps of a frame-check
        # probe; at 56 px it did (77% held out)
        object_size=56,
        teleport_px=56,
        blur_radius=5,
        # per dimension, a defect that shows in the pixels of any token it covers, in one
        # frame on its own, in a colour no clean frame has: the object turns cyan (TA colour),
        # a white streak crosses the frame along the motion (MQ smear), a magenta block takes a
        # corner (VQ dropout, as a broken decode shows it). Among the nine frames of a call the
        # tiny model learned to find these (colour 93%, smear 100% of held-out calls after the
        # call pretraining), but not a black corner block (0%: dark background cells look
        # alike), a missing object or a smear in the object's own colour (no single token
        # shows those), though it read all of them on one frame alone (100%). Noise, blur and
        # a sideways jump it never learned, even on one frame
        defect_kinds=dict(TA=("colour",), MQ=("smear",), VQ=("dropout",)),
        colours=("red", "green", "blue", "yellow"),
        defect_colours=("cyan",),
        smear_colour="white",
        dropout_colour="magenta",
    ))
    # the rollout protocol: 16 candidates per video, 4 initial frames each, 2 tool calls of up
    # to 9 frames: the oracle's scan shows video 1's 9 frames between the initial ones, then
    # video 2's, so each verdict is about the frames just returned, of one video
    c.protocol = ml_collections.ConfigDict(dict(
        num_candidates=16, num_initial_frames=4, max_turns=3, max_frames_per_call=9,
        memory_window=20,
        # a short system prompt: every row carries it, and attention cost grows with length
        system_prompt=SYSTEM_PROMPT,
    ))
    c.frame_size = (112, 112)  # bank frame (H, W): 4 x 4 merged visual tokens per frame
    # sentencepiece trained on the train split only (>= 256 byte pieces + the corpus' characters)
    c.tokenizer_vocab = 700

    # ---- model: the tiny Qwen2.5-VL (the quick run uses the same one: it checks this config)
    # 4 decoder layers: with 2, SFT's answers did not follow its own verdicts (the final
    # think named the video and dimension wrongly in 39 of 80 held-out rows, given the right
    # verdicts); with 4 every answer followed them. 4 layers cost ~45% more per SFT step
    c.model = _model(96, 4, 4, 2, 768, 64, 4)

    # ---- pretraining: the paper starts from Qwen2.5-VL, which can already see and reason; the
    # tiny model starts from random weights. Three phases, in this order, on the training pairs
    # only (experiments/demo/pretraining.py); the baseline starts from the same weights:
    # (1) captions: one candidate frame and its caption per row (colour, shape, where the object
    #     is, any effect). Without it SFT's verdicts did not depend on the pixels at all
    #     (experiments/benchmarks/verdict_probe.py: 50% attribution, frames seen or blacked out);
    # (2) reasoning: the oracle traces' text without their frames, each synthesis given, the
    #     rest of each assistant turn trained: the format, and which video, which dimension and
    #     what answer follow from what the syntheses say. Without it SFT's first steps (loss
    #     ~10 on a format never seen) undid phase (3): a held-out call phase at 96% on dropouts
    #     left an SFT model that saw none;
    # (3) calls: 1..max_frames_per_call frames of one video and the verdict on them ("Video 2:
    #     smear."), each frame set drawn afresh. After (1) alone the model read every held-out
    #     frame right but no held-out call (experiments/benchmarks/pretrain_probe.py): finding
    #     the one bad frame among nine is a skill of its own, and the oracle's own calls (the
    #     same 9 frames of each pair) were learned by heart instead
    c.pretrain = ml_collections.ConfigDict(dict(
        steps=2 if quick else 300,  # phase (1) micro-steps; 0 = no caption phase
        batch_size=4 if quick else 32,
        lr=1e-3 if quick else 2e-3,  # every phase
        warmup_steps=1 if quick else 20,  # every phase
        # defective frames are ~5% of all frames: they are captioned again until they make this
        # share of the caption rows (0 = the plain mix)
        defect_share=0.25,
        reasoning_steps=2 if quick else 200,  # phase (2) micro-steps; 0 = no text phase
        reasoning_batch_size=4 if quick else 8,
        call_steps=2 if quick else 300,  # phase (3) micro-steps; 0 = no call phase
        call_batch_size=4 if quick else 16,
        call_defect_share=0.5,  # share of the call rows with a defective frame among theirs
    ))

    # ---- stage i: cold-start SFT on the oracle traces
    c.sft = ml_collections.ConfigDict(dict(
        steps=4 if quick else 300,  # micro-steps
        batch_size=4 if quick else 8,
        lr=1e-3 if quick else 2e-3,
        warmup_steps=1 if quick else 20,
        # loss weight of the synthesis tokens (the verdict on the frames just seen) against the
        # other, formulaic, assistant tokens: the verdict is the part that needs the pixels
        synthesis_weight=5.0,
        # share of the SFT rows that are call rows as phase (3) makes them, drawn afresh
        # (rehearsal; 0 = traces only): with seed 1 and traces only, SFT forgot the smear that
        # the call phase had found in every held-out call
        call_share=0.25,
    ))
    c.max_frames = 26  # frame slots per row: 8 initial + 2 calls x 9

    # ---- stage ii: rejection-sampling FT
    c.rft = ml_collections.ConfigDict(dict(
        samples_per_prompt=2 if quick else 4,  # K rollouts per training pair
        max_prompts=4 if quick else 48,  # training pairs sampled
        batch_size=4 if quick else 8,  # rollout rows per engine call (= prompts x K); SFT batch
        steps=2 if quick else 30,  # SFT steps on the accepted traces
        lr=5e-4,
        temperature=0.7,  # sampling temperature of the K rollouts
    ))

    # ---- stage iii: GRPO
    c.grpo = ml_collections.ConfigDict(dict(
        steps=1 if quick else 5,  # rollout batches
        group_size=2 if quick else 4,  # G rollouts per prompt
        prompts_per_step=2 if quick else 4,
        lr=1e-4,
        warmup_steps=1,  # linear lr warm-up steps (Adam's first steps are the largest)
        kl_coef=0.01,  # k3 KL to the policy GRPO starts from
        temperature=0.7,  # sampling temperature of the G rollouts
        # the objective's push-down options (experiments/configs/grpo.py says what each does);
        # 1 and 1 = plain GRPO, what the default's table was measured with
        neg_adv_scale=1.0,
        neg_prob_cap=1.0,
    ))

    # ---- baseline: the same model trained to answer from the initial frames only (protocol
    # max_turns=1: no tool call is possible), on the same training pairs, same labels
    c.baseline = ml_collections.ConfigDict(dict(
        steps=4 if quick else 120,
        batch_size=4 if quick else 8,
        lr=1e-3 if quick else 2e-3,
    ))

    # ---- evaluation on the held-out split (greedy decoding)
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=6 if quick else 20,  # rollout rows per engine call (padded)
        max_len=1024,  # KV slots per row (raised to the longest oracle trace + 160)
        max_new_tokens=1024,  # generated tokens per rollout, all turns
        max_turn_tokens=256,  # tokens per assistant turn
        html_examples=6,  # held-out judgments in the HTML trace report
    ))
    c.progress = True  # tqdm bars
    if preset == "stage3":
        c.update_from_flattened_dict(STAGE3)
    return c


# The stage-iii setting (docs/measurements.md, "2026-12-05: stage iii"): the default with these
# values changed. SFT stops early, so the policy still misses defects and has room to improve;
# RFT and GRPO then learn from its own rollouts.
STAGE3 = {
    "sft.steps": 100,  # a third of the default's 300
    "grpo.steps": 8,
    # 8 rollouts per prompt (the default's 4): more groups whose rewards differ, so more rows
    # carry an advantage
    "grpo.group_size": 8,
    "grpo.warmup_steps": 2,
    # plain GRPO (grpo.neg_adv_scale = neg_prob_cap = 1, the default's): from the same RFT
    # checkpoints it lifted held-out OA diff as much as or more than neg_adv_scale 0.25 with
    # neg_prob_cap 0.9 (+18.8 / +25.0 / +6.2 against +18.8 / +15.6 / +4.7 points on seeds
    # 0 / 1 / 2), its format reward equal or higher
}
