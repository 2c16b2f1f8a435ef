"""One API: the root paths (/v1/chat/completions, /v1/messages, /v1/embeddings, /v1/models) that
reach any configured upstream by `model: "<upstream>/<model>"`, translating between formats."""
