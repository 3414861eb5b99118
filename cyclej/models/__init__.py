"""The models: names to folders (the catalog), loading and saving, NeoBERT, the embedder, cards."""
