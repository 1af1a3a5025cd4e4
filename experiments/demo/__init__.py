"""The main job on the embedded default: synthetic needle pairs -> tiny VLM -> SFT, RFT, GRPO ->
held-out results table, all on CPU.

    python -m experiments.demo     # the default (< 30 min on 2 CPU cores)
    # the tests' end-to-end run (< 3 min); a short SFT that RFT and GRPO then lift
    python -m experiments.demo --config=experiments/configs/demo.py:quick
    python -m experiments.demo --config=experiments/configs/demo.py:stage3
    python -m experiments.demo --config.seed=1 --config.sft.steps=600   # any field overridden

What it does (every number printed is measured by this run; nothing is hard-coded):

1. generates the synthetic needle video pairs (`data_pipelines.synthetic`): a defect hidden
   between the initial frames of one video, so only `select_frames` can find it; a held-out
   split that nothing is ever trained on (not the tokenizer, not any stage);
2. trains a sentencepiece tokenizer on the training split's text;
3. builds a tiny Qwen2.5-VL (`experiments/configs/demo.py`), pretrains it from random weights
   on the training pairs (`experiments/demo/pretraining.py`: frame captions, the traces' text,
   rows shaped like tool calls), and trains it through the three stages with the library's
   stage functions: cold-start SFT on the oracle traces
   (`train.sft.run_sft`), RFT (`train.rft.run_rft`: K rollouts per training pair, all-correct
   traces kept, SFT on them), GRPO (`train.grpo.run_grpo`);
4. trains the initial-frames-only baseline: the same model, same pairs and labels, SFT on
   one-turn answers under a protocol with `max_turns=1` (no tool call is possible);
5. evaluates on the held-out pairs after each stage and for the baseline (greedy rollouts,
   `eval.runner.run_model_eval`, accuracies from `eval.metrics` with their tie convention), and
   the final model with its tool disabled (every call answered "Tool use is disabled");
6. prints the results table and writes `results.json`, TensorBoard logs, an HTML trace
   report of a few held-out judgments and the final model as a reward-model export
   (`<out>/export`, what `python -m vrthinker_jax.score` and `vrthinker_jax.eval --checkpoint`
   read) under --out.

The package: `data` (pairs, banks, tokenizer, lengths), `pretraining` (the pretraining rows),
`stages` (each stage a function over the library's entry points), `evaluation` (held-out
judgments, the table), `job` (the run), `runs` (a finished run opened again, for benchmarks),
`cli` (`python -m experiments.demo`).
"""
