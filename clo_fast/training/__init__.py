"""The pieces `clo_fast/train.py` wires together, one job per module.

distributed  process group, device, rank-0 helpers, seeds and RNG state
ds_config    the ZeRO-3 JSON filled from the run config
sampler      the seeded, resumable order of examples (which examples each micro-batch takes)
optim        AdamW parameter groups and the warmup + decay LR schedule
step         one optimizer step: forward, CLO loss with global denominators, backward (in-process testable)
scoring      no-grad log-probs of a whole split (reference pass, held-out loss)
reference    the `ref_logps` column: computed once, stored with the data, reused on resume
checkpoint   atomic DeepSpeed checkpoints and resume
export       the Hugging Face model written at the end
metrics      metric sinks (JSONL, TensorBoard), the step log (averages, throughput) and the cross-rank mean
"""
