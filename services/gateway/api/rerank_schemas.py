"""Request bodies of text-ranking: the HF task's parameters, TEI's `/rerank` and the Cohere/Jina
`/v1/rerank` that vLLM and infinity serve (validated with pydantic; also what /docs shows)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.gateway.api.schemas import UINT32_MAX


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextRankingParameters(_Body):
    """text-ranking parameters (HF task API, `inputs: {query, documents}`)."""

    raw_scores: bool | None = Field(None, description="The model's logits instead of sigmoid scores (default false).")
    truncate: bool | None = Field(None, description="Cut pairs over the token limit (default true); false: 400.")
    top_n: int | None = Field(None, ge=1, le=UINT32_MAX, description="Only the n best documents (default: all).")


class TEIRerankRequest(_Body):
    """`POST /rerank`, as text-embeddings-inference takes it (`model` is ours: optional)."""

    query: str
    texts: list[str] = Field(..., min_length=1)
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = Field(None, description="Cut pairs over the token limit (default false, as TEI).")
    truncation_direction: Literal["right", "Right"] | None = Field(None, description="Only right truncation.")
    model: str | None = Field(None, description="Default: the only text-ranking model.")


class RerankDocument(_Body):
    text: str


class CohereRerankRequest(_Body):
    """`POST /v1/rerank` and `/v2/rerank`, the Cohere/Jina shape vLLM and infinity serve."""

    model: str | None = Field(None, description="Default: the only text-ranking model.")
    query: str
    documents: list[str | RerankDocument] = Field(..., min_length=1)
    top_n: int | None = Field(None, ge=0, le=UINT32_MAX, description="Only the n best (default and 0: all).")
    return_documents: bool = True
    raw_scores: bool = False
    truncate: bool = Field(True, description="Cut pairs over the token limit (default true); false: 400.")

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]
