"""``POST /v1/embeddings`` (OpenAI's shape) on the gateway's sentence-embedding model."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Literal


from pydantic import BaseModel, ConfigDict, Field, StrictStr

from shoal.gateway.embedder import Embedder

MAX_INPUTS = 2048
Texts = Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_INPUTS)]


class EmbeddingRequest(BaseModel):
    """Text only (token-id inputs are refused); texts past the model's length are truncated."""

    model_config = ConfigDict(extra="forbid")

    input: StrictStr | Texts = Field(description="A text or a list of up to 2048 texts")
    model: StrictStr | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: StrictStr | None = None


class EmbeddingError(ValueError):
    """A request the embedding model cannot answer: ``status`` and ``param`` for the API's error."""

    def __init__(self, status: int, message: str, param: str | None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


async def embeddings_response(embedder: Embedder, req: EmbeddingRequest) -> dict:
    """OpenAI's embeddings response; :class:`EmbeddingError` for a model or size it does not serve."""
    if req.model is not None and req.model != embedder.model_id:
        raise EmbeddingError(404, f"The model `{req.model}` does not give embeddings; use `{embedder.model_id}`.", "model")
    if req.dimensions is not None and req.dimensions != embedder.dim:
        raise EmbeddingError(400, f"{embedder.model_id} gives {embedder.dim} dimensions only", "dimensions")
    texts = [req.input] if isinstance(req.input, str) else req.input
    if any(not t for t in texts):
        raise EmbeddingError(400, "input holds an empty text", "input")
    vectors = await asyncio.to_thread(embedder.embed, texts)
    tokens = sum(await asyncio.to_thread(embedder.num_tokens, texts))
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
             else v.tolist()} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": embedder.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
