"""Gateway: the REST/JSON (HF task API, OpenAI API) and typed gRPC front door over the mesh."""
