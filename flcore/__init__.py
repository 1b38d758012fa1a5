"""Code both sides share: config, data and its federated split, models, training loops, metrics, reports."""
