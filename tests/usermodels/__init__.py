"""Tests of serving users' own Hugging Face model folders (issue #16): small random-initialised
models of real architectures, built here from data the repository ships, served by the mesh and
compared with transformers' / sentence-transformers' own answers on the same folder."""
