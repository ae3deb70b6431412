"""``POST /v1/embeddings`` in OpenAI's format, on the heads' own pass.

    request   {"input": "text" | ["text", ...], "model": NAME, "encoding_format": "float" | "base64"?}
    response  {"object": "list", "model": NAME, "usage": {"prompt_tokens": n, "total_tokens": n},
               "data": [{"object": "embedding", "index": i, "embedding": [...] | "<base64 float32>"}],
               "heads": [{head: answer} per input]}

The embeddings come from the same backbone call as the heads' answers (one batched Predictor
call, ``return_embedding=True``); ``heads`` is an extra field that OpenAI's clients ignore.
NAME is the backbone's name as the runs record it (``GET /v1/heads`` lists the heads; a wrong
NAME is a 404 that names the right one). The pooling is ``adl.serve.embedding``'s: the model
folder's sentence-transformers pooling and normalisation when it has them, else the mean.
``usage`` counts the tokens of each input as the heads read it (truncated at max_length).
OpenAI's python client asks for base64 unless told otherwise: float32 little-endian bytes.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictStr


class EmbeddingsRequest(BaseModel):
    input: StrictStr | list[StrictStr] = Field(description="a text or a list of texts")
    model: StrictStr = Field(description="the served backbone's name (see the 404 if unsure)")
    encoding_format: Literal["float", "base64"] = Field("float", description="floats, or base64 float32 bytes")
    dimensions: int | None = Field(None, description="must be the model's own size if given")
    user: str | None = Field(None, description="accepted and ignored")


class EmbeddingsResponse(BaseModel):
    object: str = "list"
    data: list[dict[str, Any]]
    model: str
    usage: dict[str, int]
    heads: list[dict[str, Any]] = Field(description="per input, {head name: answer}: adl's extra, from the same pass")


def model_names(manifest: dict) -> list[str]:
    """What a request may call the backbone: its name as given to adl extract, its id, the id's folder name."""
    m = manifest["model"]
    return list(dict.fromkeys(str(v) for v in (m.get("name"), m["id"], Path(str(m["id"])).name) if v))


def add_embeddings_route(app: FastAPI, predictor, submit, check_texts, guarded: list) -> None:
    """Add the route. ``submit(texts, heads, return_embedding)`` is the batcher's awaitable call;
    ``check_texts(texts)`` applies the server's limits (count, characters, empty); ``guarded`` the
    route's dependencies (the bearer check, when the server has a token)."""
    names = model_names(predictor.manifest)
    counter = copy.deepcopy(predictor.tokenizer("sequence"))  # the event loop's own: never shared with the model thread
    size = int(predictor.manifest.get("hidden_size") or 0)

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, dependencies=guarded,
              responses={401: {"description": "wrong token"}, 404: {"description": "unknown model"},
                         422: {"description": "bad input"}, 500: {"description": "the batch failed"}})
    async def embeddings_endpoint(req: EmbeddingsRequest):
        """OpenAI-compatible embeddings; every head's answer rides along in ``heads``."""
        if req.model not in names:  # a JSONResponse: the app's 404 handler would say "no such endpoint"
            return JSONResponse({"error": f"no model {req.model!r} here: this server embeds with {names[0]!r}"}, 404)
        if req.dimensions is not None and size and req.dimensions != size:
            raise HTTPException(422, f"dimensions={req.dimensions}, but {names[0]} embeds in {size}: leave it out")
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise HTTPException(422, '"input" is empty: send a text or a list of texts')
        check_texts(texts)
        answer = await submit(texts, None, True)
        lengths = [len(ids) for ids in counter(texts, truncation=True, max_length=predictor.max_length)["input_ids"]]
        data = [{"object": "embedding", "index": i, "embedding": _encoded(e, req.encoding_format)}
                for i, e in enumerate(answer.embeddings)]
        return EmbeddingsResponse(data=data, model=names[0], heads=answer.results,
                                  usage={"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)})


def _encoded(embedding: list[float], encoding_format: str):
    if encoding_format == "float":
        return embedding
    return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode("ascii")
