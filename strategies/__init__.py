"""Server strategies: the registry of Flower strategies and the composable server stages."""
