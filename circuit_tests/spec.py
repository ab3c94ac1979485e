"""Spec format v1: YAML → validated, typed objects; every error names file:line:col and the key path.

A spec states a hypothesis (the circuit, with roles), where to test it (model + checkpoints), on what
(task) and what must hold (claims). Structure is checked here; names are checked against the model's
graph once its shape is known (``graph.resolve_circuit``). ``circuit-tests schema`` prints the JSON Schema.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator,
                      model_validator)

from . import names
from ._yaml import Located, format_path, load_located, read_spec_text
from .errors import SpecError

ID_RE = r"^[A-Za-z0-9_.\-]+$"
_STRIDED = re.compile(r"^(?:step)?(\d+)\s*-\s*(?:step)?(\d+)\s*:\s*(\d+)$", re.ASCII)

# Bounds on the work a spec may ask for: checked at collection, before anything is materialised.
MAX_CHECKPOINTS = 1000      # checkpoints selected by one spec (list items or one strided range)
MAX_STEP = 10**12           # largest training step
MAX_N_SEQ = 1024            # role_score.n_seq (random repeated sequences)
MAX_SEQ_LEN = 2048          # role_score.seq_len (each half)
MAX_BATCH = 4096            # task.batch_size
MAX_SEED = 2**32 - 1
MAX_CLAIMS = 200            # claims per spec (each is one pytest item per checkpoint)

Ablation = Literal["corrupted", "mean", "mean_per_position", "zero"]
Normalization = Literal["ratio", "normalized"]
FaithMetric = Literal["logit_diff", "prob_diff", "accuracy"]


class _Strict(BaseModel):
    # strict: no "0.8" -> 0.8, no true -> 1; allow_inf_nan=False: .nan / .inf are not thresholds
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("min", "max", "max_kl", "min_effect", "level", mode="before", check_fields=False)
    @classmethod
    def _exact_float(cls, v: Any, info: Any) -> Any:
        """A float field refuses an integer that a float cannot hold (beyond 2**53): it would be rounded silently."""
        if isinstance(v, int) and not isinstance(v, bool) and info.field_name is not None:
            ann = cls.model_fields[info.field_name].annotation
            if ann is float or float in get_args(ann):
                try:
                    exact = float(v) == v
                except OverflowError:
                    exact = False
                if not exact:
                    raise ValueError(f"{v} cannot be held exactly by a float (integers up to 2**53 can); write the "
                                     "number you mean as a decimal")
        return v


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

    @field_validator("checkpoints")
    @classmethod
    def _bounded(cls, v: Any) -> Any:
        """Refuse selections that would materialise more than MAX_CHECKPOINTS steps (``0-100000000000:1``)."""
        items = v if isinstance(v, list) else [v] if v is not None else []
        if len(items) > MAX_CHECKPOINTS:
            raise ValueError(f"{len(items)} checkpoints listed; at most {MAX_CHECKPOINTS} per spec")
        total = 0
        for item in items:
            if isinstance(item, int):
                if not 0 <= item <= MAX_STEP:
                    raise ValueError(f"step {item} is outside 0..{MAX_STEP}")
                total += 1
                continue
            m = _STRIDED.match(item.strip())
            if m:
                a, b, stride = int(m[1]), int(m[2]), int(m[3])
                if stride > 0 and b >= a:
                    n = (b - a) // stride + 1
                    if n > MAX_CHECKPOINTS:
                        raise ValueError(f"range {item!r} selects {n} checkpoints; at most {MAX_CHECKPOINTS} per spec "
                                         "(use a larger stride)")
                    total += n
            if total > MAX_CHECKPOINTS:
                raise ValueError(f"the selection has more than {MAX_CHECKPOINTS} checkpoints (the limit per spec)")
        return v


class TaskSpec(BaseModel):
    """The task by name; every other key is a task parameter (validated by that task's parameter model)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, allow_inf_nan=False)
    name: str = Field(description="ioi, greater_than, gendered_pronoun, sva, colored_objects, induction, custom")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="examples per forward pass")
    prepend_bos: bool | None = Field(None, description="prepend the tokenizer's BOS token (default: true for zoo "
                                                       "models and GPT-2, false for GPT-NeoX/Pythia)")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _check_node(n: str) -> str:
    names.parse_node(n)  # NameSyntaxError is a ValueError: pydantic reports it at the node's position
    return n


def _check_edge(e: str) -> str:
    names.parse_edge(e)
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
    graph: str | None = Field(None, description="an EAP-IG / MIB graph JSON file (relative to the spec file): its "
                                                "edges with in_graph true join the circuit (edge level)")

    @model_validator(mode="after")
    def _level(self) -> "CircuitSpec":
        if self.level == "node" and (self.edges or self.graph):
            raise ValueError("level 'node' takes nodes only; remove 'edges'/'graph' or use level 'edge'")
        if not self.roles and not self.nodes and not self.edges and not self.graph:
            raise ValueError("the circuit is empty: give roles, nodes, edges or graph")
        return self

    @property
    def resolved_level(self) -> str:
        return self.level or ("edge" if self.edges or self.graph else "node")


Gate = Literal["point", "ci"]


class BootstrapSpec(_Strict):
    """How a claim's interval is computed (paired bootstrap over prompts); recorded with the result."""

    method: Literal["bca", "percentile"] = Field("bca", description="bca (bias-corrected, accelerated) or percentile")
    resamples: int = Field(2000, ge=10, le=100_000, description="bootstrap resamples (at most 100,000)")
    seed: int = Field(0, description="seed of the resampling")
    level: float = Field(0.95, gt=0, lt=1, description="confidence level of the interval")


class BaselineSpec(_Strict):
    """Random circuits of the claim's size drawn from the same graph: the faithfulness a random guess reaches."""

    kind: Literal["random"] = "random"
    k: int = Field(20, ge=2, le=1000, description="number of random circuits")
    seed: int = Field(0, description="seed of the draws")
    match: Literal["nodes", "edges"] | None = Field(None, description="nodes: same number of heads and MLPs (node-level "
                                                    "circuits); edges: same number of edges. Default: the circuit's level")
    require: str | None = Field("p95", pattern=r"^(p\d{1,2}|max|none)$",
                                description="the claim must exceed this quantile of the baseline (p50, p95, p99, max) "
                                            "or 'none' to only record it")


class _Claim(_Strict):
    id: str | None = Field(None, pattern=ID_RE, description="item name (default: the claim type, numbered if repeated)")
    gate: Gate | None = Field(None, description="point: the value decides; ci: the whole bootstrap interval must clear "
                                                "the threshold (uncertain in between). Default: the spec's gate")
    holds_from: int | None = Field(None, ge=0, description="first step at which the claim must hold; earlier "
                                                            "checkpoints must NOT show it (expected absent)")


class FaithfulnessClaim(_Claim):
    """m(C) compared with the full model: ratio = m(C)/m(M) or normalized = (m(C)-m(M'))/(m(M)-m(M'))."""

    type: Literal["faithfulness"]
    metric: FaithMetric | None = Field(None, description="default: the task's metric")
    normalization: Normalization = Field(description="ratio (Tigges et al.) or normalized (Hanna et al. / MIB)")
    min: float = Field(description="pass when the normalized value is >= min; a fraction of the full model's effect "
                                   "(1.0 = the full model), in [-1, 2]", json_schema_extra={"minimum": -1, "maximum": 2})
    max: float | None = Field(None, description="optional upper bound (e.g. to catch over-complete circuits); a "
                                                "fraction in [-1, 2]", json_schema_extra={"minimum": -1, "maximum": 2})
    max_kl: float | None = Field(None, ge=0, description="also require KL(full || circuit) at END <= max_kl")
    min_effect: float | None = Field(None, gt=0, description="denominator floor below which the model is deemed "
                                                             "unable to do the task (not_evaluated); default per metric")
    bootstrap: BootstrapSpec | None = Field(None, description="interval settings (default: the spec's bootstrap)")
    baseline: BaselineSpec | None = Field(None, description="compare with random circuits of the same size")
    ablations: list[Ablation] | None = Field(None, min_length=1, description="evaluate under each ablation; the first "
                                             "gates the claim, the others are recorded (default: the spec's ablation)")

    @model_validator(mode="after")
    def _bounds(self) -> "FaithfulnessClaim":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


ROLE_SCORES = ("previous_token", "induction", "duplicate_token", "name_mover", "copy_suppression", "successor",
               "s_inhibition")

# The units convention: every score is a fraction in [0, 1] except the copy scores, which are percent in
# [0, 100] as in Wang et al. (2023) and the zoo manifests. A threshold outside its unit's range is an error,
# and 0 < min <= 1 on a percent score is rejected as a fraction written in the wrong unit.
SCORE_UNITS: dict[str, tuple[str, float, float]] = {
    "previous_token": ("fraction", 0.0, 1.0), "induction": ("fraction", 0.0, 1.0),
    "duplicate_token": ("fraction", 0.0, 1.0), "successor": ("fraction", 0.0, 1.0),
    "s_inhibition": ("fraction", 0.0, 1.0), "name_mover": ("percent", 0.0, 100.0),
    "copy_suppression": ("percent", 0.0, 100.0),
}
# Scores computed from the task's IOI positions; the others use their own random/ordinal inputs.
SCORE_NEEDS_POSITIONS: dict[str, tuple[str, ...]] = {
    "name_mover": ("IO", "S1", "S2"), "copy_suppression": ("IO", "S1", "S2"), "s_inhibition": ("IO", "S1", "S2"),
}
FAITHFULNESS_RANGE = (-1.0, 2.0)   # a fraction of the full model's effect: 1 = as good as the full model
PATH_RATIO_RANGE = {"absolute": (0.0, 1.0), "signed": (-1.0, 2.0)}


def _percent_hint(value: float | None) -> str:
    """A fraction written as a percentage (``min: 80``) gets a did-you-mean."""
    return f"; did you mean {value / 100:g}?" if value is not None and 2 < abs(value) <= 100 else ""


def _range_problem(value: float | None, lo: float, hi: float, what: str, hint: str) -> str | None:
    if value is None or lo <= value <= hi:
        return None
    return f"{value:g} is outside [{lo:g}, {hi:g}]: {what}{hint}"


class RoleScoreClaim(_Claim):
    """The heads of a role still do what the role says: a component-function score per head vs ``min``."""

    type: Literal["role_score"]
    role: RoleName = Field(description="a role of circuit.roles; its heads are scored")
    score: Literal[ROLE_SCORES] | None = Field(None, description="which score (default: the role's name). "  # type: ignore[valid-type]
                                               "Units: previous_token/induction/duplicate_token: attention "
                                               "fraction in [0, 1]; name_mover/copy_suppression: PERCENT of "
                                               "prompts whose name is in the top-5 of the head's (negated) OV "
                                               "output, in [0, 100]; successor: fraction of ordinal pairs in "
                                               "[0, 1]; s_inhibition: 1 if the three-condition test holds, else 0. "
                                               "name_mover/copy_suppression/s_inhibition need an IOI-style task")
    heads: list[NodeName] | None = Field(None, description="score only these heads of the role")
    quantifier: Literal["all", "any", "at_least"] = Field("all", description="how many heads must reach min")
    k: int | None = Field(None, ge=1, description="with quantifier at_least")
    min: float = Field(description="pass when the quantified heads' scores are >= min, in the score's unit: a "
                                   "fraction in [0, 1], or percent in [0, 100] for name_mover/copy_suppression")
    seq_len: int = Field(30, ge=2, le=MAX_SEQ_LEN, description="repeated-sequence scores: length of each half")
    n_seq: int = Field(16, ge=1, le=MAX_N_SEQ, description="repeated-sequence scores: number of sequences")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the random sequences")

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
    # a single role may be written without brackets (the validator below makes it a list; the schema says so too)
    senders: Annotated[list[RoleName], WithJsonSchema({"anyOf": [
        {"type": "array", "items": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"}},
        {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"}]})] = Field(description="role(s) whose heads form the numerator")
    receivers: RoleName | Literal["logits"] = Field(description="'logits' (direct effect) or a role whose heads' "
                                                                "inputs receive")
    input: Literal["q", "k", "v"] = Field("q", description="which input of the receiver heads")
    denominator: Literal["all", "circuit"] = Field("all", description="all heads upstream of the receivers, or "
                                                                      "only the circuit's heads")
    measure: Literal["absolute", "signed"] = Field("absolute", description="the gated ratio: sum|e| or sum e")
    min: float = Field(description="pass when the ratio is >= min: a share in [0, 1] (measure absolute) or in "
                                   "[-1, 2] (signed)", json_schema_extra={"minimum": -1, "maximum": 2})
    max: float | None = Field(None, description="optional upper bound, same unit as min",
                              json_schema_extra={"minimum": -1, "maximum": 2})
    min_effect: float | None = Field(None, gt=0, description="floor on m(clean) - m(corrupted); default per metric")

    @model_validator(mode="after")
    def _bounds(self) -> "PathRatioClaim":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self

    @field_validator("senders", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class RoleCheckClaim(_Claim):
    """Every head labelled with the role earns it by its own scores (roles.ROLE_CRITERIA; docs/roles.md).

    One is added for every role with a criterion unless the spec declares its own (e.g. to set ``holds_from``
    for one role); it passes only when *all* labelled heads meet the criterion, so a mislabel cannot hide
    behind a ``role_score`` claim's ``quantifier: any``."""

    type: Literal["role_check"]
    role: RoleName = Field(description="a role of circuit.roles that has a criterion (docs/roles.md)")
    seq_len: int = Field(30, ge=2, le=MAX_SEQ_LEN, description="repeated-sequence criteria: length of each half")
    n_seq: int = Field(16, ge=1, le=MAX_N_SEQ, description="repeated-sequence criteria: number of sequences")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the random sequences")


class RoleChecksSpec(_Strict):
    """Settings of the role checks added for every role with a criterion."""

    holds_from: int | None = Field(None, ge=0, description="first step at which the labels must be earned; "
                                                            "earlier checkpoints must NOT show them (expected absent)")


Claim = Annotated[Union[FaithfulnessClaim, RoleScoreClaim, PathRatioClaim, RoleCheckClaim], Field(discriminator="type")]


class Spec(_Strict):
    """One circuit hypothesis for one model and task, with the claims to check at each checkpoint."""

    version: Literal[1] = 1
    name: str = Field(pattern=ID_RE, description="identifier used in reports")
    description: str = ""
    model: ModelSpec
    task: TaskSpec
    circuit: CircuitSpec
    ablation: Ablation = Field("corrupted", description="what replaces everything outside the circuit")
    gate: Gate = Field("point", description="default gate of the claims: point value or whole bootstrap interval (ci)")
    bootstrap: BootstrapSpec = Field(default_factory=BootstrapSpec, description="default interval settings")
    claims: list[Claim] = Field(min_length=1, max_length=MAX_CLAIMS, description="what must hold (at most 200 claims)")
    role_checks: RoleChecksSpec = Field(default_factory=RoleChecksSpec,
                                        description="every role with a criterion (docs/roles.md) gets a role_check "
                                                    "claim: each labelled head must earn its role by its own scores")

    @model_validator(mode="after")
    def _claim_ids(self) -> "Spec":
        seen: set[str] = set()
        for c in self.claims:
            cid = c.id or c.type
            if c.id and cid in seen:
                raise ValueError(f"duplicate claim id {cid!r}")
            seen.add(cid)
        return self

    def circuit_problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """Roles and node lists that cannot mean what they say: empty roles, a node named twice."""
        out: list[tuple[tuple[Any, ...], str]] = []
        c = self.circuit
        for role, nodes in c.roles.items():
            if not nodes:
                out.append((("circuit", "roles", role), f"role {role!r} is empty: name its nodes or remove it"))
            seen: dict[str, int] = {}
            for j, n in enumerate(nodes):
                if n in seen:
                    out.append((("circuit", "roles", role, j), f"{n} is listed twice in role {role!r}"))
                seen[n] = j
            for j, n in enumerate(nodes):
                if n in ("input", "logits"):
                    out.append((("circuit", "roles", role, j), f"{n} cannot have a role: it is in every circuit"))
        in_roles = {n: r for r, ns in c.roles.items() for n in ns}
        seen_nodes: set[str] = set()
        for j, n in enumerate(c.nodes):
            if n in seen_nodes:
                out.append((("circuit", "nodes", j), f"{n} is listed twice in circuit.nodes"))
            elif n in in_roles:
                out.append((("circuit", "nodes", j), f"{n} is already in role {in_roles[n]!r}"))
            seen_nodes.add(n)
        seen_edges: dict[tuple[str, str, str | None], int] = {}
        for j, e in enumerate(c.edges):
            s_node, r_node, qkv = names.parse_edge(e)
            key = (str(s_node), str(r_node), qkv)
            if key in seen_edges:
                out.append((("circuit", "edges", j), f"edge {e!r} is listed twice (also circuit.edges[{seen_edges[key]}])"))
            seen_edges[key] = j
        return out

    def claim_problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """Cross-checks between claims and the circuit: (key path, message) for each problem."""
        roles = self.circuit.roles
        out: list[tuple[tuple[Any, ...], str]] = []
        known = ", ".join(sorted(roles)) or "none"
        for i, c in enumerate(self.claims):
            if isinstance(c, FaithfulnessClaim):
                for key in ("min", "max"):
                    msg = _range_problem(getattr(c, key), *FAITHFULNESS_RANGE, "faithfulness is a fraction of the full "
                                         "model's effect (1.0 = the full model)",
                                         _percent_hint(getattr(c, key)))
                    if msg:
                        out.append((("claims", i, key), msg))
            elif isinstance(c, RoleScoreClaim):
                if c.score_name in SCORE_UNITS:
                    unit, lo, hi = SCORE_UNITS[c.score_name]
                    if unit == "percent" and 0 < c.min <= 1:
                        out.append((("claims", i, "min"), f"{c.min:g} looks like a fraction, but {c.score_name} scores "
                                                          f"are percent (0-100); did you mean {c.min * 100:g}?"))
                    else:
                        hint = f"; did you mean {c.min / 100:g}?" if unit == "fraction" and 1 < c.min <= 100 else ""
                        msg = _range_problem(c.min, lo, hi, f"{c.score_name} scores are a {unit} in [{lo:g}, {hi:g}]", hint)
                        if msg:
                            out.append((("claims", i, "min"), msg))
                if c.heads is not None:
                    dup = sorted({h for h in c.heads if c.heads.count(h) > 1})
                    if dup:
                        out.append((("claims", i, "heads"), f"{', '.join(dup)} listed twice"))
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
            elif isinstance(c, RoleCheckClaim):
                from .roles import ROLE_CRITERIA

                if c.role not in roles:
                    out.append((("claims", i, "role"), f"role {c.role!r} is not in circuit.roles (roles: {known})"))
                elif c.role not in ROLE_CRITERIA:
                    out.append((("claims", i, "role"), f"role {c.role!r} has no criterion; roles with one: "
                                                       f"{', '.join(ROLE_CRITERIA)}"))
                elif [x for x in self.claims[:i] if isinstance(x, RoleCheckClaim) and x.role == c.role]:
                    out.append((("claims", i, "role"), f"role {c.role!r} already has a role_check claim"))
            elif isinstance(c, PathRatioClaim):
                lo, hi = PATH_RATIO_RANGE[c.measure]
                for key in ("min", "max"):
                    v = getattr(c, key)
                    msg = _range_problem(v, lo, hi, f"the {c.measure} path ratio is a share of the effect",
                                         _percent_hint(v))
                    if msg:
                        out.append((("claims", i, key), msg))
                for j, r in enumerate(c.senders):
                    if r not in roles:
                        out.append((("claims", i, "senders", j), f"role {r!r} is not in circuit.roles (roles: {known})"))
                    elif c.senders.index(r) != j:
                        out.append((("claims", i, "senders", j), f"role {r!r} is listed twice"))
                    else:
                        other = [n for n in roles[r] if not n.startswith("a")]
                        if other:
                            out.append((("claims", i, "senders", j), f"role {r!r} has {', '.join(other)}: path ratios "
                                        "are over attention-head senders; move them to another role or circuit.nodes"))
                if c.receivers != "logits" and c.receivers not in roles:
                    out.append((("claims", i, "receivers"), f"role {c.receivers!r} is not in circuit.roles (roles: {known}) and is not 'logits'"))
                elif c.receivers != "logits":
                    other = [n for n in roles[c.receivers] if not n.startswith("a")]
                    if other:
                        out.append((("claims", i, "receivers"), f"role {c.receivers!r} has {', '.join(other)}: path-ratio "
                                    "receivers are the q/k/v inputs of attention heads (or 'logits')"))
                    both = sorted({n for r in c.senders if r in roles for n in roles[r]} & set(roles[c.receivers]))
                    if both:
                        out.append((("claims", i, "receivers"), f"{', '.join(both)} would be both sender and receiver"))
                if c.receivers == "logits" and "input" in c.model_fields_set:
                    out.append((("claims", i, "input"), "input: applies to head receivers; with receivers: logits "
                                "there is no q/k/v input (remove it)"))
        return out

    def with_role_checks(self) -> tuple["Spec", list[str]]:
        """This spec with a ``role_check`` claim appended for every role that has a criterion and no declared
        role_check, and the roles those implicit claims check (in order)."""
        from .roles import ROLE_CRITERIA

        declared = {c.role for c in self.claims if isinstance(c, RoleCheckClaim)}
        ids = {c.id for c in self.claims if c.id}
        added: list[Any] = []
        for role in self.circuit.roles:
            if role in ROLE_CRITERIA and role not in declared:
                cid = f"role_check_{role}"
                while cid in ids:
                    cid += "_"
                ids.add(cid)
                added.append(RoleCheckClaim(type="role_check", id=cid, role=role,
                                            holds_from=self.role_checks.holds_from))
        if not added:
            return self, []
        return self.model_copy(update={"claims": [*self.claims, *added]}), [c.role for c in added]

    def claim_ids(self) -> list[str]:
        """Stable, unique item names: the explicit id, else the type (numbered when a type repeats)."""
        def base(c: Any) -> str:  # a role check is named by its role (one per role)
            return f"role_check_{c.role}" if isinstance(c, RoleCheckClaim) else c.type

        counts: dict[str, int] = {}
        for c in self.claims:
            if not c.id:
                counts[base(c)] = counts.get(base(c), 0) + 1
        out, used = [], {c.id for c in self.claims if c.id}
        idx: dict[str, int] = {}
        for c in self.claims:
            if c.id:
                out.append(c.id)
                continue
            b = base(c)
            idx[b] = idx.get(b, 0) + 1
            name = b if counts[b] == 1 else f"{b}{idx[b]}"
            while name in used:
                name += "_"
            used.add(name)
            out.append(name)
        return out


class LoadedSpec:
    """A validated spec plus where it came from (for file:line in reports)."""

    def __init__(self, spec: Spec, path: Path, located: Located, implicit_roles: list[str] | None = None):
        self.spec, self.path, self.located = spec, path, located
        # claims appended by Spec.with_role_checks, located at their role in circuit.roles
        n = len(spec.claims) - len(implicit_roles or [])
        self.implicit = {n + i: ("circuit", "roles", r) for i, r in enumerate(implicit_roles or [])}

    def _path(self, keys: tuple[Any, ...]) -> tuple[Any, ...]:
        if len(keys) >= 2 and keys[0] == "claims" and keys[1] in self.implicit:
            return self.implicit[keys[1]]
        return keys

    def where(self, *keys: Any) -> str:
        return self.located.where(self._path(tuple(keys)))

    def line_of(self, *keys: Any) -> int:
        return self.located.position(self._path(tuple(keys)))[0]

    def is_implicit(self, index: int) -> bool:
        """Whether claim ``index`` was added by the spec's role checks (it has no YAML mapping of its own)."""
        return index in self.implicit

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
    if typ == "finite_number":
        return f"expected a finite number, got {inp!r}"
    if typ in _TYPE_WORDS:
        hint = ""
        if isinstance(inp, str) and typ in ("float_type", "float_parsing", "int_type", "int_parsing"):
            try:
                float(inp)
                hint = " (a quoted string: write the number without quotes)"
            except ValueError:
                pass
        elif isinstance(inp, bool) and typ in ("float_type", "int_type"):
            hint = " (a boolean is not a number)"
        return f"{_TYPE_WORDS[typ]}, got {inp!r}{hint}"
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
                                           "path_ratio": PathRatioClaim, "role_check": RoleCheckClaim}


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
    return loads_spec(read_spec_text(p), p)


def loads_spec(text: str, path: str | Path) -> LoadedSpec:
    """Validate spec ``text`` as if read from ``path`` (errors name ``path``; relative sources resolve there)."""
    p = Path(path)
    located = load_located(text, str(p))
    if not isinstance(located.data, dict):
        raise SpecError(f"{located.where(())}: (top level): expected a mapping of spec keys, got {type(located.data).__name__}")
    try:
        spec = Spec.model_validate(located.data)
    except ValidationError as e:
        raise SpecError("\n".join(format_validation_error(e, located))) from None
    problems = _check_task_params(spec, located)
    problems += [f"{located.where(path)}: {format_path(path)}: {msg}"
                 for path, msg in spec.circuit_problems() + spec.claim_problems() + _task_fit(spec)]
    if problems:
        raise SpecError("\n".join(problems))
    spec, implicit = spec.with_role_checks()
    return LoadedSpec(spec, p, located, implicit)


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


def _task_fit(spec: Spec) -> list[tuple[tuple[Any, ...], str]]:
    """Role scores that read task positions the task does not have (name_mover on induction data)."""
    from .tasks.base import TASKS

    task = TASKS.get(spec.task.name)
    if task is None or task.positions is None:
        return []
    out = []
    for i, c in enumerate(spec.claims):
        if isinstance(c, RoleScoreClaim):
            missing = [p for p in SCORE_NEEDS_POSITIONS.get(c.score_name, ()) if p not in task.positions]
            if missing:
                fits = sorted(n for n, t in TASKS.items() if t.positions is not None
                              and all(p in t.positions for p in SCORE_NEEDS_POSITIONS[c.score_name]))
                out.append((("claims", i, "score" if c.score else "role"),
                            f"the {c.score_name} score needs the task's {'/'.join(missing)} positions and task "
                            f"{spec.task.name!r} has none (it fits: {', '.join(fits) or 'no registered task'})"))
    return out


def _task_schema_model() -> Any:
    """``task:`` as editors should see it: one variant per registered task (discriminated by ``name``) with the
    common keys plus that task's own parameters. Validation itself goes through ``_check_task_params``, which
    gives the same answers with a did-you-mean for unknown task names."""
    from pydantic import create_model

    import circuit_tests.tasks  # noqa: F401  (registers every task)
    from .tasks.base import TASKS

    variants = []
    for name in sorted(TASKS):
        t = TASKS[name]
        fields: dict[str, Any] = {
            "name": (Literal[name], Field(description=(t.doc or name).strip().splitlines()[0])),  # type: ignore[valid-type]
            "batch_size": (int, TaskSpec.model_fields["batch_size"]),
            "prepend_bos": (Union[bool, None], TaskSpec.model_fields["prepend_bos"]),
        }
        cls_name = "Task_" + name
        variants.append(create_model(cls_name, __base__=t.params, **fields))
    return Annotated[Union[tuple(variants)], Field(discriminator="name")]


def json_schema() -> dict[str, Any]:
    """JSON Schema of spec v1 for editors (``# yaml-language-server: $schema=...``); ``task`` is one variant per
    registered task, so editors check task names and parameters too."""
    from pydantic import create_model

    schema_spec = create_model("Spec", __base__=Spec, __doc__=Spec.__doc__,
                               task=(_task_schema_model(), Field(description="the task by name, with its parameters")))
    schema = schema_spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "circuit_tests spec v1"
    return schema
