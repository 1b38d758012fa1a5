"""Round machinery of the server: neither a training method nor a paper stage.

Reply screening, the min-replies policy, seeded node sampling, prompt reply polling, checkpoints for
resume, the base class of strategy wrappers and the protocol server stages follow. Everything here
works with any Flower strategy and depends only on `flcore`.
"""
