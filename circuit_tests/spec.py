"""Spec format v1: YAML → validated, typed objects; every error names file:line:col and the key path.

A spec states a hypothesis (the circuit, with roles), where to test it (model + checkpoints), on what
(task) and what must hold (claims). Structure is checked here; names are checked against the model's
graph once its shape is known (``graph.resolve_circuit``). ``circuit-tests schema`` prints the JSON Schema.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ._yaml import Located, format_path, load_located
from .errors import SpecError

NODE_RE = re.compile(r"^(input|logits|a\d+\.h\d+|m\d+)$")
EDGE_RE = re.compile(r"^(?P<s>input|a\d+\.h\d+|m\d+)->(?P<r>a\d+\.h\d+(<[qkv]>)?|m\d+|logits)$")
ID_RE = r"^[A-Za-z0-9_.\-]+$"

Ablation = Literal["corrupted", "mean", "mean_per_position", "zero"]
Normalization = Literal["ratio", "normalized"]
FaithMetric = Literal["logit_diff", "prob_diff", "accuracy"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Where the weights come from and which checkpoints to test."""

    source: str = Field(description="zoo:NAME, a local HF directory (or a directory of step<N> subdirectories; "
                                    "relative to the spec file), or a hub id such as EleutherAI/pythia-160m")
    revision: str | None = Field(None, description="hub revision (branch/tag/commit) when testing one revision")
    checkpoints: list[Union[int, str]] | str | None = Field(
        None, description="steps to test: a list ([0, 512, 1000]), a range ('1000-5000' or '1000-5000:1000'), "
                          "or 'all' (default: all available)")

    @field_validator("source")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class TaskSpec(BaseModel):
    """The task by name; every other key is a task parameter (validated by that task's parameter model)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(description="ioi, greater_than, gendered_pronoun, sva, colored_objects, induction, custom")
    batch_size: int = Field(32, ge=1, description="examples per forward pass")
    prepend_bos: bool | None = Field(None, description="prepend the tokenizer's BOS token (default: true for zoo "
                                                       "models and GPT-2, false for GPT-NeoX/Pythia)")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _check_node(n: str) -> str:
    if not NODE_RE.match(n):
        raise ValueError(f"{n!r} is not a node name: expected a{{L}}.h{{H}} (attention head), m{{L}} (MLP), "
                         "input or logits")
    return n


def _check_edge(e: str) -> str:
    if not EDGE_RE.match(e.replace(" ", "")):
        raise ValueError(f"{e!r} is not an edge: expected SENDER->RECEIVER such as a0.h1->a3.h2<q>, "
                         "m2->a5.h0<v>, input->m0, a11.h10->logits")
    return e


def _check_role(r: str) -> str:
    if not re.match(r"^[a-z][a-z0-9_]*$", r):
        raise ValueError(f"role name {r!r} must be lower_snake_case")
    return r


NodeName = Annotated[str, AfterValidator(_check_node)]
EdgeName = Annotated[str, AfterValidator(_check_edge)]
RoleName = Annotated[str, AfterValidator(_check_role)]


class CircuitSpec(_Strict):
    """The hypothesised circuit: nodes by role, optional extra nodes, optional explicit edges."""

    level: Literal["node", "edge"] | None = Field(
        None, description="node: all edges among the named nodes (plus input and logits); edge: exactly the listed "
                          "edges. Default: edge when edges are given, else node")
    roles: dict[RoleName, list[NodeName]] = Field(default_factory=dict, description="role -> nodes, e.g. name_mover: [a9.h9]")
    nodes: list[NodeName] = Field(default_factory=list, description="circuit nodes without a role")
    edges: list[EdgeName] = Field(default_factory=list, description="explicit edges, e.g. a0.h1->a3.h2<q>; a head "
                                                                    "receiver without <q|k|v> means all three")

    @model_validator(mode="after")
    def _level(self) -> "CircuitSpec":
        if self.level == "node" and self.edges:
            raise ValueError("level 'node' takes nodes only; remove 'edges' or use level 'edge'")
        if not self.roles and not self.nodes and not self.edges:
            raise ValueError("the circuit is empty: give roles, nodes or edges")
        return self

    @property
    def resolved_level(self) -> str:
        return self.level or ("edge" if self.edges else "node")


class _Claim(_Strict):
    id: str | None = Field(None, pattern=ID_RE, description="item name (default: the claim type, numbered if repeated)")
    holds_from: int | None = Field(None, ge=0, description="first step at which the claim must hold; earlier "
                                                            "checkpoints must NOT show it (expected absent)")


class FaithfulnessClaim(_Claim):
    """m(C) compared with the full model: ratio = m(C)/m(M) or normalized = (m(C)-m(M'))/(m(M)-m(M'))."""

    type: Literal["faithfulness"]
    metric: FaithMetric | None = Field(None, description="default: the task's metric")
    normalization: Normalization = Field(description="ratio (Tigges et al.) or normalized (Hanna et al. / MIB)")
    min: float = Field(description="pass when the normalized value is >= min")
    max: float | None = Field(None, description="optional upper bound (e.g. to catch over-complete circuits)")
    max_kl: float | None = Field(None, ge=0, description="also require KL(full || circuit) at END <= max_kl")
    min_effect: float | None = Field(None, gt=0, description="denominator floor below which the model is deemed "
                                                             "unable to do the task (not_evaluated); default per metric")

    @model_validator(mode="after")
    def _bounds(self) -> "FaithfulnessClaim":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


ROLE_SCORES = ("previous_token", "induction", "duplicate_token", "name_mover", "copy_suppression", "successor",
               "s_inhibition")


class RoleScoreClaim(_Claim):
    """The heads of a role still do what the role says: a component-function score per head vs ``min``."""

    type: Literal["role_score"]
    role: RoleName = Field(description="a role of circuit.roles; its heads are scored")
    score: Literal[ROLE_SCORES] | None = Field(None, description="which score (default: the role's name). "  # type: ignore[valid-type]
                                               "previous_token/induction/duplicate_token: attention fraction; "
                                               "name_mover/copy_suppression: % top-5 (negative) copy score; "
                                               "successor: fraction of ordinal pairs; s_inhibition: 1 if the "
                                               "three-condition test holds")
    heads: list[NodeName] | None = Field(None, description="score only these heads of the role")
    quantifier: Literal["all", "any", "at_least"] = Field("all", description="how many heads must reach min")
    k: int | None = Field(None, ge=1, description="with quantifier at_least")
    min: float
    seq_len: int = Field(30, ge=2, description="repeated-sequence scores: length of each half")
    n_seq: int = Field(16, ge=1, description="repeated-sequence scores: number of sequences")
    seed: int = 0

    @model_validator(mode="after")
    def _k(self) -> "RoleScoreClaim":
        if (self.quantifier == "at_least") != (self.k is not None):
            raise ValueError("k is required with quantifier 'at_least' and only allowed there")
        return self

    @property
    def score_name(self) -> str:
        return self.score or self.role


class PathRatioClaim(_Claim):
    """Share of the path-patching effect on a receiver set that flows through a sender role (Tigges Fig. 4)."""

    type: Literal["path_ratio"]
    senders: list[RoleName] = Field(description="roles whose heads form the numerator")
    receivers: RoleName | Literal["logits"] = Field(description="'logits' (direct effect) or a role whose heads' "
                                                                "inputs receive")
    input: Literal["q", "k", "v"] = Field("q", description="which input of the receiver heads")
    denominator: Literal["all", "circuit"] = Field("all", description="all heads upstream of the receivers, or "
                                                                      "only the circuit's heads")
    measure: Literal["absolute", "signed"] = Field("absolute", description="the gated ratio: sum|e| or sum e")
    min: float
    max: float | None = None
    min_effect: float | None = Field(None, gt=0, description="floor on m(clean) - m(corrupted); default per metric")

    @field_validator("senders", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


Claim = Annotated[Union[FaithfulnessClaim, RoleScoreClaim, PathRatioClaim], Field(discriminator="type")]


class Spec(_Strict):
    """One circuit hypothesis for one model and task, with the claims to check at each checkpoint."""

    version: Literal[1] = 1
    name: str = Field(pattern=ID_RE, description="identifier used in reports")
    description: str = ""
    model: ModelSpec
    task: TaskSpec
    circuit: CircuitSpec
    ablation: Ablation = Field("corrupted", description="what replaces everything outside the circuit")
    claims: list[Claim] = Field(min_length=1)

    @model_validator(mode="after")
    def _claim_ids(self) -> "Spec":
        seen: set[str] = set()
        for c in self.claims:
            cid = c.id or c.type
            if c.id and cid in seen:
                raise ValueError(f"duplicate claim id {cid!r}")
            seen.add(cid)
        return self

    def claim_problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """Cross-checks between claims and the circuit: (key path, message) for each problem."""
        roles = self.circuit.roles
        out: list[tuple[tuple[Any, ...], str]] = []
        known = ", ".join(sorted(roles)) or "none"
        for i, c in enumerate(self.claims):
            if isinstance(c, RoleScoreClaim):
                if c.role not in roles:
                    out.append((("claims", i, "role"), f"role {c.role!r} is not in circuit.roles (roles: {known})"))
                    continue
                if c.score is None and c.role not in ROLE_SCORES:
                    out.append((("claims", i, "role"), f"no score is named {c.role!r}; add score: one of {', '.join(ROLE_SCORES)}"))
                heads = c.heads if c.heads is not None else roles[c.role]
                for j, h in enumerate(heads):
                    if c.heads is not None and h not in roles[c.role]:
                        out.append((("claims", i, "heads", j), f"{h} is not a head of role {c.role!r} ({', '.join(roles[c.role])}): "
                                                                "a role score on a head outside the circuit's role"))
                    if not h.startswith("a"):
                        out.append((("claims", i, "heads" if c.heads is not None else "role"), f"{h} is not an attention head: role scores score heads"))
                if c.k is not None and c.k > len(heads):
                    out.append((("claims", i, "k"), f"k = {c.k} but the role has {len(heads)} head(s)"))
                if c.score_name == "s_inhibition" and "name_mover" not in roles:
                    out.append((("claims", i, "role"), "the s_inhibition score needs the circuit's name_mover role"))
            elif isinstance(c, PathRatioClaim):
                for j, r in enumerate(c.senders):
                    if r not in roles:
                        out.append((("claims", i, "senders", j), f"role {r!r} is not in circuit.roles (roles: {known})"))
                if c.receivers != "logits" and c.receivers not in roles:
                    out.append((("claims", i, "receivers"), f"role {c.receivers!r} is not in circuit.roles (roles: {known}) and is not 'logits'"))
        return out

    def claim_ids(self) -> list[str]:
        """Stable, unique item names: the explicit id, else the type (numbered when a type repeats)."""
        counts: dict[str, int] = {}
        for c in self.claims:
            if not c.id:
                counts[c.type] = counts.get(c.type, 0) + 1
        out, used = [], {c.id for c in self.claims if c.id}
        idx: dict[str, int] = {}
        for c in self.claims:
            if c.id:
                out.append(c.id)
                continue
            idx[c.type] = idx.get(c.type, 0) + 1
            name = c.type if counts[c.type] == 1 else f"{c.type}{idx[c.type]}"
            while name in used:
                name += "_"
            used.add(name)
            out.append(name)
        return out


class LoadedSpec:
    """A validated spec plus where it came from (for file:line in reports)."""

    def __init__(self, spec: Spec, path: Path, located: Located):
        self.spec, self.path, self.located = spec, path, located

    def where(self, *keys: Any) -> str:
        return self.located.where(tuple(keys))

    def line_of(self, *keys: Any) -> int:
        return self.located.position(tuple(keys))[0]

    @property
    def dir(self) -> Path:
        return self.path.parent


# ---------------------------------------------------------------- error formatting

_TYPE_WORDS = {
    "float_parsing": "expected a number", "float_type": "expected a number", "int_parsing": "expected an integer",
    "int_type": "expected an integer", "int_from_float": "expected an integer", "bool_parsing": "expected true or false",
    "bool_type": "expected true or false", "string_type": "expected a string", "list_type": "expected a list",
    "dict_type": "expected a mapping", "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
}


def _data_path(data: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Map pydantic's ``loc`` onto the YAML data: keep keys/indices that exist, keep a final absent key
    (missing / unknown key), drop union and discriminator tags (``claims.1.faithfulness.min``)."""
    out: list[Any] = []
    cur = data
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
        elif i == len(loc) - 1 and isinstance(cur, dict) and isinstance(part, str):
            out.append(part)
    return tuple(out)


def _message(err: dict[str, Any], allowed: list[str]) -> str:
    typ, inp = err["type"], err.get("input")
    if typ == "extra_forbidden":
        key = err["loc"][-1]
        near = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return f"unknown key {key!r}{hint}"
    if typ == "missing":
        return "missing required key"
    if typ in _TYPE_WORDS:
        return f"{_TYPE_WORDS[typ]}, got {inp!r}"
    if typ == "literal_error":
        exp = err.get("ctx", {}).get("expected", "")
        return f"expected one of {exp}, got {inp!r}"
    if typ == "union_tag_invalid":
        return f"unknown claim type {err.get('ctx', {}).get('tag')!r}; expected one of {err.get('ctx', {}).get('expected_tags')}"
    if typ == "union_tag_not_found":
        return f"missing 'type' (one of: {', '.join(CLAIM_TYPES)})"
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    return f"{msg}, got {inp!r}" if typ in ("greater_than_equal", "greater_than", "less_than_equal", "string_pattern_mismatch", "too_short") else msg


CLAIM_TYPES: dict[str, type[BaseModel]] = {"faithfulness": FaithfulnessClaim, "role_score": RoleScoreClaim,
                                           "path_ratio": PathRatioClaim}


def _allowed_keys(data: Any, path: tuple[Any, ...]) -> list[str]:
    """Keys allowed in the mapping at ``path`` (for 'did you mean'): the fields of the model that parses it."""
    model: type[BaseModel] | None = {(): Spec, ("model",): ModelSpec, ("task",): TaskSpec,
                                     ("circuit",): CircuitSpec}.get(tuple(path))
    if model is None and len(path) == 2 and path[0] == "claims" and isinstance(path[1], int):
        try:
            model = CLAIM_TYPES.get(data["claims"][path[1]].get("type"))
        except (KeyError, IndexError, TypeError, AttributeError):
            model = None
    return list(model.model_fields) if model else []


def format_validation_error(e: ValidationError, located: Located, prefix: tuple[Any, ...] = ()) -> list[str]:
    lines = []
    for err in e.errors():
        loc = prefix + tuple(err["loc"])
        path = _data_path(located.data, loc)
        is_key = err["type"] == "extra_forbidden"
        where = located.where(path[:-1]) if err["type"] == "missing" else located.where(path, key=is_key)
        lines.append(f"{where}: {format_path(path)}: {_message(err, _allowed_keys(located.data, path[:-1]))}")
    return lines


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a spec file (structure and task parameters); raises SpecError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{p}: cannot read spec file: {e.strerror}") from None
    located = load_located(text, str(p))
    if not isinstance(located.data, dict):
        raise SpecError(f"{located.where(())}: (top level): expected a mapping of spec keys, got {type(located.data).__name__}")
    try:
        spec = Spec.model_validate(located.data)
    except ValidationError as e:
        raise SpecError("\n".join(format_validation_error(e, located))) from None
    problems = _check_task_params(spec, located)
    problems += [f"{located.where(path)}: {format_path(path)}: {msg}" for path, msg in spec.claim_problems()]
    if problems:
        raise SpecError("\n".join(problems))
    return LoadedSpec(spec, p, located)


def _check_task_params(spec: Spec, located: Located) -> list[str]:
    """Validate ``task:`` extras with the named task's own parameter model (lazy import: tasks need torch)."""
    import circuit_tests.tasks  # noqa: F401  (registers every task)
    from .tasks.base import TASKS as tasks

    name = spec.task.name
    if name not in tasks:
        near = difflib.get_close_matches(name, list(tasks), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return [f"{located.where(('task', 'name'))}: task.name: unknown task {name!r}{hint}; known: {', '.join(sorted(tasks))}"]
    params_model = tasks[name].params
    try:
        params_model.model_validate(spec.task.params)
    except ValidationError as e:
        out = []
        for err in e.errors():
            path = ("task",) + tuple(err["loc"])
            is_key = err["type"] == "extra_forbidden"
            allowed = ["name", "batch_size", "prepend_bos", *params_model.model_fields]
            where = located.where(path[:-1] if err["type"] == "missing" else path, key=is_key)
            out.append(f"{where}: {format_path(path)}: {_message(err, allowed)}")
        return out
    return []


def json_schema() -> dict[str, Any]:
    """JSON Schema of spec v1 for editors (``# yaml-language-server: $schema=...``)."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "circuit_tests spec v1"
    return schema
