"""Routes: a model name that stands for several upstream targets, with retries, fallbacks, circuits and routing."""
