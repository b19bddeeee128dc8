"""Inference providers: the local mesh and remote OpenAI / TGI / TEI / HF-compatible servers behind
one model id; selection policies, live health (EWMA stats, circuit breakers), and failover that is
safe for streams and money. Imports neither the pipeline nor the control plane: the service layer
(service/routing.py) joins them."""
