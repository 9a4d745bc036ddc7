"""What the store's JSON says, as frozen typed nodes (docs/store-format.md).

Each node type reads its sealed ``attributes.vinekv`` with ``from_attrs`` (checking every field,
`CorruptMetadataError` naming the file and the field) and writes them with ``to_attrs`` (the
body the store seals). The names of the per-trajectory fields vinekv itself writes are here too,
so the trainer, replay and the CLI read them by constant, never by string.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from vinekv.kvstore.codecs import KVCodec, get_codec
from vinekv.kvstore.errors import CorruptMetadataError, StoreFormatError
from vinekv.kvstore.integrity import ATTEMPT, check_layout
from vinekv.kvstore.state import KVLayout

FORMAT = "vinekv.kvstore"
FORMAT_VERSION = 2
MAX_CHUNK_TOKENS = 2**16

MC_FIELD = "mc"  # a trajectory's MC values (`vinekv.replay.values.MCRecord`), written by `replay_run`
REWARD_FIELD = "vinekv_reward"  # the rollout's reward
GROUP_FIELD = "vinekv_group"  # the rollout's prompt group in its batch
ENTROPY_FIELD = "vinekv_entropy"  # ``[T]`` the policy's entropy at each response position
ROLLOUT_FIELD = "vinekv_rollout"  # a run's field: how its rollouts were sampled (`vinekv.replay.config.RolloutRecipe`)
OWN_FIELD_PREFIX = "vinekv_"  # fields vinekv writes besides ``mc``: not given to reward functions
RESERVED_FIELDS = (MC_FIELD,)  # written by `replay_run` (`annotate`), never by `spill`
RESERVED_NAMES = ("zarr.json",)  # the store's own file names
NODE_GROUPS = ("prompts", "trajectories")  # a run's groups of nodes
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_name(kind: str, name: Any) -> str:
    """``name`` (a run or trajectory id: str or int) as a str, or ValueError/TypeError naming the
    rule it breaks."""
    if isinstance(name, bool) or not isinstance(name, str | int | np.integer):
        raise TypeError(f"{kind} must be a str or an int, got {type(name).__name__}")
    name = str(name)
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{kind} {name!r} breaks the naming rule: 1-128 characters, letters, digits, '_', '.' and '-' "
            "only (no spaces, slashes or control characters), not starting with '.' or '-'"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"{kind} {name!r} is reserved (a file name of the store's own)")
    return name


def run_prefix(run: str) -> str:
    return f"runs/{run}/"


def prompt_prefix(run: str, key: str) -> str:
    return f"runs/{run}/prompts/{key}/"


def trajectory_prefix(run: str, trajectory_id: str) -> str:
    return f"runs/{run}/trajectories/{trajectory_id}/"


def run_of(prefix: str) -> str:
    """The run a node prefix ``runs/<run>/...`` is in."""
    return prefix.split("/")[1]


def check_chunk_tokens(chunk_tokens: Any) -> int:
    """``chunk_tokens`` if it is an int in ``[1, MAX_CHUNK_TOKENS]``, else ValueError."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
        raise ValueError(f"chunk_tokens must be an int in [1, {MAX_CHUNK_TOKENS}], got {chunk_tokens!r}")
    return chunk_tokens


def check_chunking(codec: KVCodec, chunk_tokens: int) -> None:
    """ValueError unless ``chunk_tokens`` is a multiple of each of ``codec``'s token groups."""
    for name, group in codec.token_groups().items():
        if chunk_tokens % group:
            raise ValueError(
                f"chunk_tokens {chunk_tokens} must be a multiple of codec {codec.name!r}'s token group {group} "
                f"(array {name!r})"
            )


@dataclasses.dataclass(frozen=True)
class RootMeta:
    """The store root's attributes: format, the codec and chunking of new nodes, the layout every
    snapshot shares (None until the first spill)."""

    codec: Mapping[str, Any]
    chunk_tokens: int
    layout: KVLayout | None = None
    about: str = "KV snapshots of rollouts written by vinekv; see docs/store-format.md"

    @staticmethod
    def check_format(attrs: Any, where: str) -> None:
        """`StoreFormatError` unless ``attrs`` are a vinekv store root of this format version."""
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
            raise StoreFormatError(f"{where}: a Zarr node that is not a vinekv store (no attributes.vinekv.format)")
        version = attrs.get("format_version")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{where}: store format version {version!r}; this vinekv reads version {FORMAT_VERSION}"
            )

    @classmethod
    def from_attrs(cls, attrs: Any, where: str) -> RootMeta:
        """The root of a vinekv store of this format version; `StoreFormatError` for anything else
        (another format or version), `CorruptMetadataError` for malformed fields."""
        cls.check_format(attrs, where)
        try:
            codec = get_codec(attrs["codec"])
            check_chunking(codec, check_chunk_tokens(attrs["chunk_tokens"]))
            layout = None if attrs["layout"] is None else check_layout(attrs["layout"], where)
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptMetadataError(f"{where}: malformed store attributes ({type(err).__name__}: {err})") from None
        return cls(attrs["codec"], attrs["chunk_tokens"], layout, attrs.get("about", cls.about))

    def to_attrs(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "codec": dict(self.codec),
            "chunk_tokens": self.chunk_tokens,
            "layout": None if self.layout is None else self.layout.to_dict(),
            "about": self.about,
        }


@dataclasses.dataclass(frozen=True)
class RunNode:
    """A run's attributes: its generation (a fresh id each time the run is created; None: a run
    made before generations), creation time (s since the epoch) and JSON fields about the whole
    run (`ROLLOUT_FIELD`: how its rollouts were sampled; empty for runs made before them)."""

    generation: str | None
    created: float | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)

    kind = "run"

    @classmethod
    def from_attrs(cls, attrs: Any, where: str) -> RunNode:
        _check_kind(attrs, cls.kind, where)
        generation = attrs.get("generation")
        if generation is not None and not isinstance(generation, str):
            raise CorruptMetadataError(f"{where}: generation must be a str, got {generation!r}")
        fields = attrs.get("fields", {})
        if not isinstance(fields, dict):
            raise CorruptMetadataError(f"{where}: fields must be a JSON object, got {type(fields).__name__}")
        return cls(generation, attrs.get("created"), fields)

    def to_attrs(self) -> dict[str, Any]:
        attrs = {"kind": self.kind, "created": self.created, "generation": self.generation}
        return {**attrs, "fields": self.fields} if self.fields else attrs  # runs without fields keep their seal


@dataclasses.dataclass(frozen=True)
class NodeIdentity:
    """Where a node was written: its key prefix and its run's generation (None: a run made
    before generations). Sealed with the node, so a node's files copied elsewhere are refused."""

    at: str
    generation: str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class _KVNode:
    """What prompt and trajectory nodes share: the KV of ``stored_tokens`` tokens in ``arrays``."""

    length: int
    fingerprint: str
    layout: KVLayout
    codec: Mapping[str, Any]
    arrays: Mapping[str, str] = dataclasses.field(default_factory=dict)  # array name -> metadata digest
    chunk_hashes: Mapping[str, list[str]] | None = None  # array name -> content hash per chunk
    data: str = ""  # folder of the arrays inside the node (an attempt folder on object stores)
    identity: NodeIdentity | None = None

    kind = ""

    @property
    def stored_tokens(self) -> int:
        """Tokens whose KV the node's arrays hold."""
        return self.length

    def kv_codec(self, where: str) -> KVCodec:
        """The codec the node records, or `CorruptMetadataError` naming ``where``."""
        try:
            return get_codec(dict(self.codec))
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptMetadataError(f"{where}: malformed codec {self.codec!r} ({err})") from None

    def _common_attrs(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "layout": self.layout.to_dict(),
            "codec": dict(self.codec),
            **({} if self.identity is None else {"node": dataclasses.asdict(self.identity)}),
            "arrays": dict(self.arrays),
            **({} if self.chunk_hashes is None else {"chunk_hashes": dict(self.chunk_hashes)}),
            **({"data": self.data} if self.data else {}),
        }

    @staticmethod
    def _common_fields(attrs: dict[str, Any], where: str) -> dict[str, Any]:
        """The shared fields of sealed node ``attrs``, checked."""

        def fail(problem: str) -> CorruptMetadataError:
            return CorruptMetadataError(f"{where}: {problem}")

        layout = check_layout(attrs.get("layout"), where)
        for name in ("fingerprint", "codec", "arrays"):
            expected = str if name == "fingerprint" else dict
            if not isinstance(attrs.get(name), expected):
                raise fail(f"{name} must be a {expected.__name__}, got {type(attrs.get(name)).__name__}")
        data = attrs.get("data", "")
        if not isinstance(data, str) or (data and not (data.endswith("/") and ATTEMPT.fullmatch(data[:-1]))):
            raise fail(f"data must name an attempt folder ('attempt-<ms>-<hex>/'), got {data!r}")
        identity = attrs.get("node")  # absent in nodes written before identities were sealed
        if identity is not None and not (
            isinstance(identity, dict)
            and set(identity) == {"at", "generation"}
            and isinstance(identity.get("at"), str)
            and (identity.get("generation") is None or isinstance(identity.get("generation"), str))
        ):
            raise fail(f"node must be an object {{at: str, generation: str or null}}, got {identity!r}")
        hashes = attrs.get("chunk_hashes")
        if hashes is not None and not (
            isinstance(hashes, dict)
            and all(isinstance(v, list) and all(isinstance(h, str) for h in v) for v in hashes.values())
        ):
            raise fail("chunk_hashes must map array names to lists of hex digests")
        return {
            "length": _count(attrs, "length", 1, where),
            "fingerprint": attrs["fingerprint"],
            "layout": layout,
            "codec": attrs["codec"],
            "arrays": attrs["arrays"],
            "chunk_hashes": hashes,
            "data": data,
            "identity": None if identity is None else NodeIdentity(identity["at"], identity["generation"]),
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptNode(_KVNode):
    """A prompt's KV, stored once per content (``runs/<run>/prompts/<key>/``).

    Attributes:
      token_ids: ``[length]`` the prompt's tokens.
    """

    token_ids: tuple[int, ...]

    kind = "prompt"

    @classmethod
    def from_attrs(cls, attrs: Any, where: str) -> PromptNode:
        """The node sealed ``attrs`` describe, or `CorruptMetadataError` naming ``where`` and the field."""
        _check_kind(attrs, cls.kind, where)
        common = cls._common_fields(attrs, where)
        return cls(token_ids=_token_list(attrs, "token_ids", common["length"], where), **common)

    def to_attrs(self) -> dict[str, Any]:
        return {"kind": self.kind, "length": self.length, "token_ids": list(self.token_ids), **self._common_attrs()}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrajectoryNode(_KVNode):
    """One trajectory (``runs/<run>/trajectories/<id>/``): its response's KV, token ids and fields.

    Attributes:
      prompt: the content key of its prompt node.
      prompt_len: tokens of the prompt (``length - prompt_len`` response tokens).
      response_token_ids: ``[length - prompt_len]`` the response's tokens.
      fields: the JSON fields given at spill (task fields, ``vinekv_*``) and ``mc`` once valued.
    """

    prompt: str
    prompt_len: int
    response_token_ids: tuple[int, ...]
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    kind = "trajectory"

    @property
    def stored_tokens(self) -> int:
        return self.length - self.prompt_len

    @property
    def reward(self) -> float | None:
        """The rollout's reward (field ``vinekv_reward``), None when not stored."""
        return self.fields.get(REWARD_FIELD)

    @property
    def entropy(self) -> list[float] | None:
        """``[T]`` the policy's entropy per response position (field ``vinekv_entropy``), or None."""
        return self.fields.get(ENTROPY_FIELD)

    @property
    def task_fields(self) -> dict[str, Any]:
        """The fields reward functions receive: all but ``mc`` and vinekv's own ``vinekv_*``."""
        return {k: v for k, v in self.fields.items() if k != MC_FIELD and not k.startswith(OWN_FIELD_PREFIX)}

    @classmethod
    def from_attrs(cls, attrs: Any, where: str) -> TrajectoryNode:
        """The node sealed ``attrs`` describe, or `CorruptMetadataError` naming ``where`` and the field."""
        _check_kind(attrs, cls.kind, where)
        common = cls._common_fields(attrs, where)
        prompt_len = _count(attrs, "prompt_len", 1, where)
        if prompt_len > common["length"]:
            raise CorruptMetadataError(f"{where}: prompt_len {prompt_len} exceeds length {common['length']}")
        response = _token_list(attrs, "response_token_ids", common["length"] - prompt_len, where)
        if not isinstance(attrs.get("prompt"), str) or not isinstance(attrs.get("fields"), dict):
            raise CorruptMetadataError(f"{where}: prompt must be a str and fields an object")
        return cls(
            prompt=attrs["prompt"], prompt_len=prompt_len, response_token_ids=response, fields=attrs["fields"], **common
        )

    def to_attrs(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "format_version": FORMAT_VERSION,
            "prompt": self.prompt,
            "prompt_len": self.prompt_len,
            "length": self.length,
            "response_token_ids": list(self.response_token_ids),
            "fields": dict(self.fields),
            **self._common_attrs(),
        }


def node_from_attrs(attrs: Any, kind: str, where: str) -> PromptNode | TrajectoryNode:
    """``PromptNode`` or ``TrajectoryNode`` (by ``kind``) of sealed ``attrs``."""
    return (PromptNode if kind == PromptNode.kind else TrajectoryNode).from_attrs(attrs, where)


def _check_kind(attrs: Any, kind: str, where: str) -> None:
    if not isinstance(attrs, dict):
        raise CorruptMetadataError(f"{where}: attributes.vinekv is {type(attrs).__name__}, not an object")
    if attrs.get("kind") != kind:
        raise CorruptMetadataError(f"{where}: kind {attrs.get('kind')!r}, expected {kind!r}")


def _count(attrs: dict[str, Any], name: str, low: int, where: str) -> int:
    value = attrs.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CorruptMetadataError(f"{where}: {name} must be an int >= {low}, got {value!r}")
    return value


def _token_list(attrs: dict[str, Any], name: str, n: int, where: str) -> tuple[int, ...]:
    ids = attrs.get(name)
    if not isinstance(ids, list) or len(ids) != n:
        got = f"{len(ids)}" if isinstance(ids, list) else type(ids).__name__
        raise CorruptMetadataError(f"{where}: {name} must list {n} token ids, got {got}")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in ids):
        raise CorruptMetadataError(f"{where}: {name} holds a value that is not a token id")
    return tuple(ids)


__all__ = [
    "ENTROPY_FIELD",
    "FORMAT",
    "FORMAT_VERSION",
    "GROUP_FIELD",
    "MC_FIELD",
    "NodeIdentity",
    "PromptNode",
    "REWARD_FIELD",
    "RESERVED_FIELDS",
    "RootMeta",
    "RunNode",
    "check_name",
    "TrajectoryNode",
]
