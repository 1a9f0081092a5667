"""Artifacts loaded and unloaded while the server runs, with vLLM's endpoints and bodies
(``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``, ``POST /v1/unload_lora_adapter``
``{"lora_name"}``), behind the API key like every ``/v1/`` route.

A loaded artifact is checked as at start (``open_artifact``: its manifest, spec and head), must be trained on
a base this server already holds (the base's weights compared, as ``load`` does) and joins that base beside
the others (``AdapterSpec.join``), under the base's lock, between two decoding steps. Only artifacts loaded
this way can be unloaded (those named on the command line stay); an unloaded one's running generations are
cancelled first and leave at the next step. ``max_loras`` bounds how many are resident at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.artifacts.format import open_artifact
from adapters.errors import AdaptersError
from adapters.serving.backbones import Served, SharedBackbone, group_key, join_group


class Refused(Exception):
    """A load or unload refused: its HTTP status and message (answered in OpenAI's error shape)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": None, "code": None}}


async def json_body(request: Any, fields: set[str]) -> dict[str, Any]:
    """The request's JSON object, with no field beyond ``fields`` (else ``Refused`` 400, as vLLM answers)."""
    try:
        body = await request.json()
    except ValueError:
        raise Refused(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise Refused(400, f"Unrecognized request argument supplied: {', '.join(unknown)}")
    return body


def request_schemas() -> tuple[dict[str, Any], dict[str, Any], dict[int | str, Any]]:
    """The OpenAPI request bodies of the load and unload routes, and their 200 answer (plain text)."""

    def schema(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
        body = {"type": "object", "required": required, "properties": properties, "additionalProperties": False}
        return {"requestBody": {"content": {"application/json": {"schema": body}}, "required": True}}

    name = {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}
    load = schema(
        ["lora_name", "lora_path"],
        {
            "lora_name": name,
            "lora_path": {"type": "string", "minLength": 1},
            "lora_int_id": {"type": "integer"},
            "base_model_name": {"type": "string"},
        },
    )
    unload = schema(["lora_name"], {"lora_name": name, "lora_int_id": {"type": "integer"}})
    done: dict[int | str, Any] = {
        200: {"description": "done", "content": {"text/plain": {"schema": {"type": "string"}}}}
    }
    return load, unload, done


@dataclass
class RuntimeAdapters:
    """The artifacts loaded at run time into ``served`` (shared with the app's routes)."""

    served: dict[str, Served]
    max_loras: int = 8
    loaded: dict[str, Served] = field(default_factory=dict)

    def load(self, name: Any, path: Any) -> Served:
        if not isinstance(name, str) or not name or "/" in name:
            raise Refused(400, "lora_name must be a non-empty name without '/'")
        if not isinstance(path, str) or not path:
            raise Refused(400, "lora_path must be the folder of a saved artifact")
        if name in self.served:  # 409: the request is fine, the server's state is in the way
            raise Refused(409, f"The model {name!r} is already served; unload it first or choose another name")
        if len(self.loaded) >= self.max_loras:
            raise Refused(409, f"{len(self.loaded)} adapters are loaded, the limit (--max-loras); unload one first")
        if not (Path(path) / "qadapters.json").is_file():
            raise Refused(404, f"no artifact at {path!r} (no folder with a qadapters.json on the server)")
        try:
            artifact = open_artifact(path)
        except AdaptersError as err:
            raise Refused(400, str(err)) from None
        group = self._group_for(artifact)
        try:
            with group.lock:  # between two decoding steps
                member = join_group(group, name, artifact)
                group.members.append(member)
        except AdaptersError as err:
            raise Refused(400, str(err)) from None
        self.served[name] = self.loaded[name] = member
        return member

    def leaving(self, name: Any) -> Served:
        """The runtime artifact ``name``, taken out of ``served`` (no new request finds it); ``unload`` then
        removes it from its base once the app has cancelled its work."""
        if not isinstance(name, str):
            raise Refused(400, "lora_name must be the name of an adapter loaded at run time")
        if name not in self.loaded:
            status, why = (409, "it was named when the server started") if name in self.served else (404, "no such")
            raise Refused(status, f"cannot unload {name!r}: {why}; only adapters loaded at run time unload")
        member = self.loaded.pop(name)
        del self.served[name]
        return member

    def unload(self, member: Served) -> None:
        group = member.group
        with group.lock:
            group.members.remove(member)
            if member.adapter is not None:
                member.adapter.leave(group.model, member.handle)

    def _group_for(self, artifact: Any) -> SharedBackbone:
        key = group_key(artifact)
        groups = {id(s.group): s.group for s in self.served.values()}.values()
        for group in groups:
            if group.accepts(key, artifact.adapter):
                return group
        raise Refused(
            400,
            f"{artifact.path} was trained on a base this server does not hold (or with a quantization or dtype it "
            f"does not serve): {artifact.spec.base.name!r}; start a server for that base",
        )
