"""Property-based fuzzing of every public method through the gateway.

Requests are drawn from the message descriptors (scalars at their edges, enums with
unknown values, strings that are ids of the test world, other UUIDs, not UUIDs, empty,
huge, unicode, NUL; repeated and map fields, nested messages, Structs up to past the
nesting limits, timestamps out of range, field masks naming real and unknown fields),
sometimes sent as raw, corrupted or truncated bytes. Each call, mostly as the instance
admin and sometimes with no token, must answer OK or a status carrying an ErrorInfo
with a reason, never UNKNOWN or INTERNAL, and a refused call must leave every row of
the test world as it was (a hash of the rows before and after the call).

Commands are never fuzzed into something runnable and paths stay inside a temporary
directory: a board admin may make the workspace service run commands and directories.
The two instance-wide maintenance calls (ReapOrphanedRuns, ReconcileStrandedIssues)
are made as a company admin (refused), so they do no work on other tests' rows.
Bounded and reproducible: a fixed number of examples, derandomized.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import pkgutil
import string
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paperclip
from common.errors import STATUS_DETAILS_KEY
from common.request_decoding import MAX_STRUCT_DEPTH
from common.sql import sql
from gateway.app import AUTH_SERVICE
from gateway.routes import PUBLIC_SERVICES
from tests.gateway.conftest import GatewayEnv, World, bearer
from tests.harness import insert_run
from tests.workspace_service.support import insert_workspace

#: Examples per method: 42 methods, about half a minute on two cores.
EXAMPLES = 20
#: Services of the paperclip packages that only services call (never routed).
INTERNAL_SERVICES = frozenset(
    {"paperclip.issues.v1.IssueLockService", "paperclip.workspaces.v1.WorkspaceLeaseService"}
)
#: Instance-wide maintenance: made as a company admin, see the module docstring.
MAINTENANCE = frozenset({"ReapOrphanedRuns", "ReconcileStrandedIssues"})
#: A server stream with a live subject never ends by itself: called with this deadline.
STREAM_DEADLINE_S = 0.3
UNARY_DEADLINE_S = 20.0
#: Tables written by background bookkeeping, not by the calls under test.
BOOKKEEPING = frozenset(
    {"runs.supervisor_nodes", "runs.consumer_cursors", "workspaces.workspace_hosts"}
)
FUZZED_SCHEMAS = ("issues", "runs", "workspaces", "audit", "gateway")

_COMMAND_FIELDS = frozenset({"provision_command", "teardown_command", "cleanup_command"})
_PATH_FIELDS = frozenset({"cwd", "repo_path", "provider_ref"})
_JSON = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})


def public_methods() -> list[MethodDescriptor]:
    """Every method of every public service in the paperclip protos."""
    for module in pkgutil.walk_packages(paperclip.__path__, "paperclip."):
        if module.name.endswith("_pb2"):
            importlib.import_module(module.name)
    pool = descriptor_pool.Default()
    methods: list[MethodDescriptor] = []
    for name in sorted(_paperclip_services()):
        if name not in INTERNAL_SERVICES:
            methods.extend(pool.FindServiceByName(name).methods)
    return methods


def _paperclip_services() -> set[str]:
    names: set[str] = set()
    for module in pkgutil.walk_packages(paperclip.__path__, "paperclip."):
        if module.name.endswith("_pb2"):
            file = importlib.import_module(module.name).DESCRIPTOR
            names.update(service.full_name for service in file.services_by_name.values())
    return names


METHODS = public_methods()


def test_every_public_service_is_fuzzed() -> None:
    """The fuzzed services are exactly what the gateway serves: its own and the routed."""
    fuzzed = {method.containing_service.full_name for method in METHODS}
    assert fuzzed == {*PUBLIC_SERVICES, AUTH_SERVICE}
    assert len(METHODS) >= 40


@dataclass(frozen=True)
class Pool:
    """Values worth drawing for string fields: ids of the test world by kind
    (``company``, ``issue``, ``agent``, ``run``, ``workspace``, ``api_key``, ``user``)."""

    by_kind: dict[str, tuple[str, ...]]
    identifiers: tuple[str, ...]
    tmp: str

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(i for ids in self.by_kind.values() for i in ids)

    def of(self, kind: str | None) -> tuple[str, ...]:
        return self.by_kind.get(kind or "", ()) or self.ids


#: The kind of id an ``id`` field holds, by its message.
_ID_OF = {
    "Company": "company",
    "Issue": "issue",
    "Agent": "agent",
    "Run": "run",
    "ExecutionWorkspace": "workspace",
    "ApiKey": "api_key",
}


def _id_kind(field: FieldDescriptor, kinds: Iterable[str]) -> str | None:
    """The kind of id a string field holds (``assignee_agent_id``: agent), if any."""
    if field.name == "id":
        owner = field.containing_type
        return _ID_OF.get(owner.name, "") if owner is not None else ""
    for kind in sorted(kinds, key=len, reverse=True):
        if field.name.endswith((f"{kind}_id", f"{kind}_ids")):
            return kind
    return "" if field.name.endswith(("_id", "_ids")) else None


_WORDS = st.text(alphabet=string.ascii_letters + " -", min_size=1, max_size=12)


def _plausible_string(pool: Pool, field: FieldDescriptor) -> st.SearchStrategy[str]:
    """What a client that knows the API sends in a string field, by its name."""
    name = field.name
    if name == "page_token":
        return st.just("")
    if name == "issue":
        return st.sampled_from(pool.of("issue") + pool.identifiers)
    kind = _id_kind(field, pool.by_kind)
    if kind is not None:
        return st.sampled_from(pool.of(kind))
    if name == "issue_prefix":
        return st.text(alphabet=string.ascii_uppercase, min_size=2, max_size=10)
    return _WORDS


def _strings(pool: Pool) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(pool.ids),
        st.sampled_from(pool.identifiers),
        st.uuids().map(str),
        st.uuids().map(lambda u: str(u).upper()),
        st.sampled_from(["", " ", "\x00", "null", "-1", "PAP-0", "💥", "a" * 100_001]),
        st.text(max_size=24),
    )


def _paths(pool: Pool, *, wild: bool) -> st.SearchStrategy[str]:
    safe = st.text(alphabet="abcxyz-_.", min_size=1, max_size=8)
    if not wild:
        return st.one_of(st.just(pool.tmp), safe.map(lambda name: f"{pool.tmp}/{name}"))
    return st.one_of(
        st.just(pool.tmp),
        safe.map(lambda name: f"{pool.tmp}/{name}"),
        st.sampled_from(["", "relative/dir", "/dev/null", "/proc/1/x", "\x00", "/" + "a" * 5000]),
        st.text(max_size=16).filter(lambda s: not s.strip().startswith("/")),
    )


#: Never a runnable command: empty, blank, NUL or too long.
_COMMANDS = st.sampled_from(["", "   ", "\x00", "x" * 100_001])

_INT32 = st.one_of(
    st.sampled_from([0, 1, -1, 50, 500, 501, 2**31 - 1, -(2**31)]),
    st.integers(-(2**31), 2**31 - 1),
)
_INT64 = st.one_of(_INT32, st.sampled_from([2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
_UINT32 = st.integers(0, 2**32 - 1)
_UINT64 = st.integers(0, 2**64 - 1)
_SMALL = st.integers(-2, 600)
#: Plausible values: what a client that mostly knows the API would send.
_PLAUSIBLE: dict[int, st.SearchStrategy[Any]] = {
    **{
        kind: _SMALL
        for kind in (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_SFIXED32,
            FieldDescriptor.TYPE_INT64,
            FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_SFIXED64,
        )
    },
    **{
        kind: st.integers(0, 600)
        for kind in (
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_FIXED64,
        )
    },
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.floats(-10, 1000),
    FieldDescriptor.TYPE_FLOAT: st.floats(-10, 1000, width=32),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=8),
}
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=32),
}


def _json_value(depth: int, *, finite: bool = True) -> st.SearchStrategy[Any]:
    """A JSON value with at most ``depth`` levels of objects and lists (numbers:
    ``finite`` or also NaN and infinities, which JSON has not)."""
    numbers = st.floats(allow_nan=not finite, allow_infinity=not finite)
    leaves = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8))
    if depth <= 1:
        return leaves
    inner = _json_value(depth - 1, finite=finite)
    return st.one_of(
        leaves,
        st.dictionaries(st.text(max_size=6), inner, max_size=2),
        st.lists(inner, max_size=2),
    )


def _chain(levels: int) -> dict[str, Any]:
    """``{"a": {"a": ... {}}}``: ``levels`` objects."""
    out: dict[str, Any] = {}
    for _ in range(levels - 1):
        out = {"a": out}
    return out


#: Objects of every interesting size: small, at and just past the limit, past protobuf's.
_JSON_OBJECTS = st.one_of(
    st.dictionaries(st.text(max_size=6), _json_value(3, finite=False), max_size=3),
    st.sampled_from(
        [_chain(n) for n in (MAX_STRUCT_DEPTH, MAX_STRUCT_DEPTH + 1, 40, 99)]
        + [{"big": "x" * 70_000}]
    ),
)


class Mode(enum.Enum):
    """How wild a request is: every value plausible (ids of the world by kind, known
    enum values, small numbers, valid times, real field-mask paths: it gets past
    validation); plausible but for one field drawn wild (and named by the field mask,
    if the request has one); or every value wild (edge cases, any subset of fields)."""

    PLAUSIBLE = "plausible"
    ONE_WILD = "one wild"
    WILD = "wild"


class Strategies:
    """Request strategies for one test world, built from the message descriptors; in
    ONE_WILD mode ``target`` is the path of the wild field."""

    def __init__(self, pool: Pool, mode: Mode, target: str | None = None) -> None:
        self.pool = pool
        self.mode = mode
        self.target = target
        self.strings = _strings(pool)

    def leaf(
        self, path: str, plausible: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]
    ) -> st.SearchStrategy[Any]:
        """The value at ``path`` as the mode draws it."""
        if self.mode is Mode.WILD or (self.mode is Mode.ONE_WILD and path == self.target):
            return wild
        return plausible

    def request(self, method: MethodDescriptor) -> st.SearchStrategy[Message]:
        cls = message_factory.GetMessageClass(method.input_type)
        masks = _mask_paths(method.input_type)
        named = self._named_by_mask(method.input_type)
        wild_path = (self.target or "").partition(".")[2]

        def build(fill: Callable[[Message], None]) -> Message:
            message = cls()
            fill(message)
            for mask in named:
                getattr(message, mask).paths.append(wild_path)
            return message

        return self.fill(method.input_type, masks, "").map(build)

    def _named_by_mask(self, descriptor: Descriptor) -> list[str]:
        """The request's field masks that should name the wild field (a field of the
        resource being updated), so the service reads it."""
        if self.target is None or "." not in self.target:
            return []
        return [
            field.name
            for field in descriptor.fields
            if field.message_type is not None
            and field.message_type.full_name == "google.protobuf.FieldMask"
        ]

    def fill(
        self, descriptor: Descriptor, masks: tuple[str, ...], path: str
    ) -> st.SearchStrategy[Callable[[Message], None]]:
        """A function that sets fields of a message: all of them, or (wild) any subset
        (a request that leaves out a required field never gets past validation)."""
        special = self._well_known(descriptor, masks, path)
        if special is not None:
            return special
        setters = {
            field.name: self.field(field, masks, _join(path, field.name))
            for field in descriptor.fields
        }

        def apply(values: dict[str, Callable[[Message], None]]) -> Callable[[Message], None]:
            def fill(message: Message) -> None:
                for setter in values.values():
                    setter(message)

            return fill

        chosen = (
            st.fixed_dictionaries({}, optional=setters)
            if self.mode is Mode.WILD
            else st.fixed_dictionaries(setters)
        )
        return chosen.map(apply)

    def field(
        self, field: FieldDescriptor, masks: tuple[str, ...], path: str
    ) -> st.SearchStrategy[Callable[[Message], None]]:
        """A setter of one field (repeated and map fields: a few elements)."""
        name = field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            keys = self.scalar(key_field, path)
            if value_field.message_type is not None:
                values = self.fill(value_field.message_type, masks, path)
                return st.dictionaries(keys, values, max_size=3).map(
                    lambda d: lambda m: _fill_map(getattr(m, name), d)
                )
            return st.dictionaries(keys, self.scalar(value_field, path), max_size=3).map(
                lambda d: lambda m: getattr(m, name).update(d)
            )
        if field.message_type is not None:
            sub = self.fill(field.message_type, masks, path)
            if field.is_repeated:
                return st.lists(sub, max_size=3).map(
                    lambda fs: lambda m: _fill_repeated(getattr(m, name), fs)
                )
            return sub.map(lambda f: lambda m: _set_message(m, name, f))
        element = self.scalar(field, path)
        if field.is_repeated:
            return st.lists(element, max_size=4).map(
                lambda vs: lambda m: getattr(m, name).extend(vs)
            )
        return element.map(lambda v: lambda m: setattr(m, name, v))

    def scalar(self, field: FieldDescriptor, path: str) -> st.SearchStrategy[Any]:
        if field.enum_type is not None:
            numbers = [v.number for v in field.enum_type.values]
            known = st.sampled_from(numbers)
            specified = st.sampled_from([n for n in numbers if n != 0] or numbers)
            return self.leaf(path, specified, st.one_of(known, _INT32))
        if field.type == FieldDescriptor.TYPE_STRING:
            if field.name in _COMMAND_FIELDS or (field.name == "command" and not field.is_repeated):
                return _COMMANDS
            if field.name in _PATH_FIELDS:
                return self.leaf(path, _paths(self.pool, wild=False), _paths(self.pool, wild=True))
            # Left empty now and then: some fields exclude others (one assignee).
            plausible = _plausible_string(self.pool, field)
            return self.leaf(path, st.one_of(plausible, plausible, st.just("")), self.strings)
        return self.leaf(path, _PLAUSIBLE[field.type], _SCALARS[field.type])

    def _well_known(
        self, descriptor: Descriptor, masks: tuple[str, ...], path: str
    ) -> st.SearchStrategy[Callable[[Message], None]] | None:
        name = descriptor.full_name
        objects = self.leaf(path, _json_value(1).map(lambda v: {"k": v}), _JSON_OBJECTS)
        if name == "google.protobuf.Struct":
            return objects.map(lambda d: lambda m: _struct(m, d))
        if name == "google.protobuf.ListValue":
            values = self.leaf(path, _json_value(3), _json_value(3, finite=False))
            return st.lists(values, max_size=3).map(lambda vs: lambda m: _list(m, vs))
        if name == "google.protobuf.Value":
            values = self.leaf(path, _json_value(3), _json_value(3, finite=False))
            return st.one_of(values, objects).map(lambda v: lambda m: _value(m, v))
        if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            valid = st.tuples(st.integers(0, 4_102_444_800), st.integers(0, 999_999_999))
            edges = st.tuples(_INT64, _INT32)
            return self.leaf(path, valid, edges).map(lambda sn: lambda m: _set_time(m, *sn))
        if name == "google.protobuf.FieldMask":
            real = st.sampled_from(masks or ("",))
            paths = self.leaf(path, real, st.one_of(real, st.text(max_size=12)))
            return st.lists(paths, min_size=1, max_size=2).map(
                lambda ps: lambda m: m.paths.extend(ps)
            )
        return None


def leaf_paths(descriptor: Descriptor, prefix: str = "") -> list[str]:
    """The paths of a message's fields a ONE_WILD request may make wild: scalars,
    well-known types and the fields inside nested messages."""
    out: list[str] = []
    for field in descriptor.fields:
        path = _join(prefix, field.name)
        sub = field.message_type
        if sub is None or sub.GetOptions().map_entry or sub.full_name.startswith("google."):
            out.append(path)
        else:
            out.extend(leaf_paths(sub, path))
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fill_map(target: Any, fills: dict[Any, Callable[[Message], None]]) -> None:
    for key, fill in fills.items():
        fill(target[key])


def _fill_repeated(target: Any, fills: list[Callable[[Message], None]]) -> None:
    for fill in fills:
        fill(target.add())


def _set_time(message: Any, seconds: int, nanos: int) -> None:
    message.seconds = seconds
    message.nanos = nanos


def _set_message(message: Message, name: str, fill: Callable[[Message], None]) -> None:
    sub = getattr(message, name)
    sub.SetInParent()
    fill(sub)


def _struct(message: Any, data: dict[str, Any]) -> None:
    # In place: copying a Struct deeper than protobuf's decode limit would fail.
    cur = message
    while set(data) == {"a"} and isinstance(data["a"], dict):
        cur = cur.fields["a"].struct_value
        data = data["a"]
    cur.update(data)


def _list(message: Any, values: list[Any]) -> None:
    message.extend(values)


def _value(message: Any, value: Any) -> None:
    if isinstance(value, dict):
        _struct(message.struct_value, value)
    elif isinstance(value, list):
        message.list_value.extend(value)
    elif value is None:
        message.null_value = 0
    elif isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, float):
        message.number_value = value
    else:
        message.string_value = value


def _mask_paths(descriptor: Descriptor) -> tuple[str, ...]:
    """Field-mask paths worth naming: the fields of the request's messages, a level
    or two down (``config``, ``config.runtime``, ``runtime_config.timeout_seconds``)."""
    out: list[str] = []

    def walk(d: Descriptor, prefix: str, depth: int) -> None:
        for field in d.fields:
            path = f"{prefix}{field.name}"
            out.append(path)
            sub = field.message_type
            if sub is not None and depth < 2 and sub.full_name not in _JSON:
                walk(sub, f"{path}.", depth + 1)

    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.full_name not in _JSON:
            walk(field.message_type, "", 0)
    return tuple(out)


@st.composite
def _wire(draw: st.DrawFn, message: st.SearchStrategy[Message], *, wild: bool) -> bytes:
    """The encoding of a drawn request; wild ones sometimes corrupted, truncated or
    random bytes."""
    data = draw(message).SerializeToString()
    if not wild:
        return data
    mode = draw(st.sampled_from(["intact"] * 5 + ["flip", "truncate", "random"]))
    if mode == "flip" and data:
        index = draw(st.integers(0, len(data) - 1))
        return data[:index] + bytes([draw(st.integers(0, 255))]) + data[index + 1 :]
    if mode == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if mode == "random":
        return draw(st.binary(max_size=48))
    return data


@dataclass
class Fuzz:
    """The test world the fuzzer aims at, its callers and its row fingerprint."""

    gw: GatewayEnv
    pool: Pool
    channel: grpc.aio.Channel
    #: The metadata of each caller (passed per call: grpc.aio's client interceptors
    #: apply to one kind of call only).
    callers: dict[str, tuple[tuple[str, str], ...]]
    fingerprint_sql: str
    companies: list[uuid.UUID]
    _strategies: dict[tuple[str, Mode, str | None], st.SearchStrategy[Message]] = dataclasses.field(
        default_factory=dict
    )
    #: The fingerprint after the last refused call (None after a call that succeeded):
    #: unchanged since, as nothing else writes the test world's rows.
    last: tuple[Any, ...] | None = None

    def requests(
        self, method: MethodDescriptor, mode: Mode, target: str | None
    ) -> st.SearchStrategy[Message]:
        key = (method.full_name, mode, target)
        if key not in self._strategies:
            self._strategies[key] = Strategies(self.pool, mode, target).request(method)
        return self._strategies[key]

    async def fingerprint(self) -> tuple[Any, ...]:
        async with self.gw.db.unit_of_work() as tx:
            row = await tx.fetchrow(sql(self.fingerprint_sql), {"companies": self.companies})
        assert row is not None
        return tuple(row)


async def _fingerprint_sql(gw: GatewayEnv) -> str:
    """One statement: per table, the count and a hash of the rows of the test world
    (by company, run, agent or issue; small global tables whole)."""
    async with gw.db.unit_of_work() as tx:
        rows = await tx.fetch(
            sql(
                """
                SELECT table_schema || '.' || table_name AS name,
                       array_agg(column_name::text) AS columns
                FROM information_schema.columns
                WHERE table_schema = ANY(:schemas)
                GROUP BY 1 ORDER BY 1
                """
            ),
            {"schemas": list(FUZZED_SCHEMAS)},
        )
    parts: list[str] = []
    for row in rows:
        name, columns = row["name"], set(row["columns"])
        if name in BOOKKEEPING or name.endswith("alembic_version"):
            continue
        company = "company_id = ANY(:companies)"
        if "company_id" in columns:
            where = company
        elif "run_id" in columns:
            where = f"run_id IN (SELECT id FROM runs.heartbeat_runs WHERE {company})"
        elif "agent_id" in columns:
            where = f"agent_id IN (SELECT id FROM runs.agents WHERE {company})"
        elif "issue_id" in columns:
            where = f"issue_id IN (SELECT id FROM issues.issues WHERE {company})"
        else:
            where = "true"
        parts.append(
            f"(SELECT count(*)::text || ':' || coalesce(sum(hashtextextended(t::text, 0)"
            f'::numeric), 0)::text FROM {name} t WHERE {where}) AS "{name}"'
        )
    return "SELECT " + ", ".join(parts)


@pytest.fixture(scope="module")
async def fuzz(gw: GatewayEnv, world: World) -> AsyncIterator[Fuzz]:
    with tempfile.TemporaryDirectory(prefix="paperclip-fuzz-") as tmp:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            yield await _fuzz(gw, world, tmp, channel)


async def _fuzz(gw: GatewayEnv, world: World, tmp: str, channel: grpc.aio.Channel) -> Fuzz:
    """The pool of the test world (a workspace, a live and a finished run added)."""
    workspace = await insert_workspace(gw.db, world.company_a, cwd=f"{tmp}/primary")
    run_id = await insert_run(gw.db, company_id=world.company_a, agent_id=world.agent_a)
    finished = await insert_run(
        gw.db, company_id=world.company_a, agent_id=world.agent_a, status="failed"
    )
    pool = Pool(
        by_kind={
            "company": (world.company_a, world.company_b),
            "issue": (world.issue_a.id, world.issue_b.id),
            "agent": (world.agent_a, world.agent_b),
            "run": (run_id, finished),
            "workspace": (str(workspace.id),),
            "api_key": (world.member_a.api_key.id,),
            "user": (world.member_a.api_key.user_id,),
        },
        identifiers=(world.issue_a.identifier, world.issue_b.identifier),
        tmp=tmp,
    )
    return Fuzz(
        gw=gw,
        pool=pool,
        channel=channel,
        callers={
            "admin": bearer(gw.admin_token),
            "company_admin": bearer(world.admin_a.token),
            "anonymous": (),
        },
        fingerprint_sql=await _fingerprint_sql(gw),
        companies=[uuid.UUID(world.company_a), uuid.UUID(world.company_b)],
    )


def _identity(value: bytes) -> bytes:
    return value


async def _call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    data: bytes,
    metadata: tuple[tuple[str, str], ...],
) -> tuple[grpc.StatusCode, Any]:
    """Call ``method`` with raw ``data``: the code and the trailing metadata."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path, request_serializer=_identity, response_deserializer=_identity
            )(data, timeout=STREAM_DEADLINE_S, metadata=metadata)
            async for _ in stream:
                pass
            return grpc.StatusCode.OK, await stream.trailing_metadata()
        unary = channel.unary_unary(
            path, request_serializer=_identity, response_deserializer=_identity
        )
        await unary(data, timeout=UNARY_DEADLINE_S, metadata=metadata)
        return grpc.StatusCode.OK, None
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.trailing_metadata()


def _error_info(trailing: Any) -> error_details_pb2.ErrorInfo | None:
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


@pytest.mark.parametrize(
    "method", METHODS, ids=[f"{m.containing_service.name}.{m.name}" for m in METHODS]
)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(data=st.data())
async def test_no_input_answers_unknown_or_internal_or_writes_when_refused(
    fuzz: Fuzz, method: MethodDescriptor, data: st.DataObject
) -> None:
    mode = data.draw(st.sampled_from(list(Mode)), label="mode")
    targets = leaf_paths(method.input_type)
    target = (
        data.draw(st.sampled_from(targets), label="wild field")
        if mode is Mode.ONE_WILD and targets
        else None
    )
    requests = fuzz.requests(method, mode, target)
    request = data.draw(_wire(requests, wild=mode is Mode.WILD), label="request")
    who = data.draw(st.sampled_from(["admin"] * 7 + ["anonymous"]), label="caller")
    if method.name in MAINTENANCE and who == "admin":
        who = "company_admin"
    before = fuzz.last if fuzz.last is not None else await fuzz.fingerprint()
    fuzz.last = None
    code, trailing = await _call(fuzz.channel, method, request, fuzz.callers[who])
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (code, trailing)
    if code is grpc.StatusCode.OK or (
        # The stream of a live run stays open until the fuzzer's own deadline.
        method.server_streaming and code is grpc.StatusCode.DEADLINE_EXCEEDED
    ):
        return
    info = _error_info(trailing)
    assert info is not None and info.reason, (code, trailing)
    if who == "anonymous":
        assert code is grpc.StatusCode.UNAUTHENTICATED
    after = await fuzz.fingerprint()
    assert after == before, (code, info.reason)
    fuzz.last = after
