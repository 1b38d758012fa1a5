"""The ClientApp: local training on one partition; never loads CLIP or the LLM."""
