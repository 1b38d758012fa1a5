"""Stage 1 (server, before round 1): LLaVA annotation and Dynamic Weighted Pretraining. Not built yet."""
