"""Fakes for remote services, each a real server on loopback (tests/fakes/upstream.py: an
OpenAI / TGI / TEI / HF server with fault injection)."""
