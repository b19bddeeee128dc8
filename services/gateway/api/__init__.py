"""Transports only: HF, OpenAI, TGI and admin routes, the typed gRPC servicer. Parse, call service/, render."""
