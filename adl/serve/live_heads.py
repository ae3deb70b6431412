"""Heads loaded and unloaded while the server runs: ``POST /v1/heads`` and ``DELETE /v1/heads/{name}``.

A head is loaded from ``--runs-dir D`` only, by a plain folder name (``D/<name>``, never a path),
onto the running backbone; a run on another backbone is refused. The change runs on the model
thread in queue order (``Batcher.control``): requests queued before it are computed as they
were admitted, so no request in flight is affected. Unloading removes the name from the served
heads first (new requests naming it get 422), then from the Predictor once the requests queued
before it have run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from adl.errors import AdlError

# a plain folder name: no separator, no "..", no leading dot, dash or other surprise
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(description="a run folder's name inside the server's --runs-dir")


class Served:
    """The heads being served: the names requests may ask for, and /v1/heads' document."""

    def __init__(self, predictor, batcher, runs_dir: str | None):
        self.predictor, self.batcher = predictor, batcher
        self.runs_dir = Path(runs_dir) if runs_dir else None
        self.names = list(predictor.names)
        self.doc = {"heads": jsonable(batcher.call(predictor.heads_info))}

    def folder(self, name: str) -> Path:
        """``name`` as a folder of --runs-dir, or the HTTP error that says why not."""
        if self.runs_dir is None:
            raise HTTPException(403, "loading heads is off: start the server with --runs-dir D, the folder heads "
                                     "may be loaded from")
        if not _NAME.fullmatch(name) or ".." in name:
            raise HTTPException(422, f"{name!r} is not a plain folder name: send the name of a run folder inside "
                                     "--runs-dir, without '/' or '..'")
        path = self.runs_dir / name
        if not path.is_dir():
            raise HTTPException(404, f"no run folder {name!r} in --runs-dir: train one with `adl train --out "
                                     f"{self.runs_dir / name}`")
        return path

    async def load(self, name: str) -> dict:
        path = self.folder(name)
        if name in self.names:
            raise HTTPException(409, f"head {name!r} is loaded already: unload it first (DELETE /v1/heads/{name})")

        def add():
            self.predictor.add(path)
            return self.predictor.heads_info()

        try:
            info = await self.batcher.control(add)
        except AdlError as e:
            raise HTTPException(409, f"cannot load {name!r}: {e}") from None
        self.doc = {"heads": jsonable(info)}
        self.names = list(self.predictor.names)
        return next(h for h in self.doc["heads"] if h["name"] == name)

    async def unload(self, name: str) -> dict:
        if name not in self.names:
            raise HTTPException(404, f"no head {name!r} is loaded: this server has {', '.join(self.names)}")
        if len(self.names) == 1:
            raise HTTPException(409, f"{name!r} is the only head: load another before unloading it")
        self.names = [n for n in self.names if n != name]  # new requests for it are refused from now on

        def remove():
            self.predictor.remove(name)
            return self.predictor.heads_info()

        self.doc = {"heads": jsonable(await self.batcher.control(remove))}
        return {"unloaded": name, "heads": self.names}


def jsonable(value):
    """heads_info() may hold numpy or torch scalars: JSON them through float/int/str."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
