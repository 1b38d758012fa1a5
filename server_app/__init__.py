"""The ServerApp and the launcher that runs it through a local Flower SuperLink."""
