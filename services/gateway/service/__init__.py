"""One use-case per request kind (predict, embed, generate, rerank): authorize, admit, run, settle."""
