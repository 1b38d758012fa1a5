"""Stage 1 (server, before round 1): LLaVA annotation and Dynamic Weighted Pretraining of the FL backbone.

`teacher` loads LLaVA (or the tiny random one), `prompts` + `annotate` write LLaVA-format instruction
data, `llava_data` reads it into batches, `dwp` trains g_fl through the frozen LLaVA, `checkpoints` keeps
per-epoch state and the cached result, and `stage` is the `pretrain` server stage that hands the
pretrained backbone to round 1.
"""
