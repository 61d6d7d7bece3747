"""Developer tools: ``python -m tools.benchmark`` measures training and evaluation throughput."""
