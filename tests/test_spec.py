"""Spec loading: valid specs load; every mistake is a SpecError naming file:line:col and the key path."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuit_tests.errors import SpecError
from circuit_tests.spec import json_schema, load_spec

VALID = textwrap.dedent("""\
    name: demo
    description: a demo spec
    model:
      source: zoo:induction
      checkpoints: [0, 2000]
    task:
      name: induction
      size: 16
      seed: 0
    circuit:
      roles:
        previous_token: [a0.h1]
        induction: [a1.h2, a1.h3]
    ablation: corrupted
    claims:
      - type: faithfulness
        normalization: normalized
        min: 0.8
      - type: faithfulness
        id: ratio
        metric: logit_diff
        normalization: ratio
        min: 0.7
        holds_from: 2000
    """)


def write(tmp_path, text, name="s.circuit.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(tmp_path, text):
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    return str(ei.value), str(p)


def test_valid_spec_loads(tmp_path):
    ls = load_spec(write(tmp_path, VALID))
    s = ls.spec
    assert s.name == "demo" and s.model.checkpoints == [0, 2000] and s.task.params == {"size": 16, "seed": 0}
    assert s.circuit.resolved_level == "node" and s.claim_ids() == ["faithfulness", "ratio"]
    assert ls.line_of("claims", 1) == 19 and ls.where("circuit", "roles", "induction", 1).endswith(":13:24")


@pytest.mark.parametrize("old,new,where,msg", [
    ("    min: 0.8\n", "    min: high\n", ":18:10", "claims[0].min: expected a number, got 'high'"),
    ("  seed: 0\n", "  seed: 0\n  sed: 1\n", ":10:3", "task.sed: unknown key 'sed'"),
    ("ablation: corrupted", "ablaton: corrupted", ":14:1", "ablaton: unknown key 'ablaton' (did you mean 'ablation'?)"),
    ("  source: zoo:induction\n", "  sorce: zoo:induction\n", ":4:3", "model.sorce: unknown key 'sorce' (did you mean 'source'?)"),
    ("    normalization: normalized\n", "    normalization: normalised\n", ":17:20", "claims[0].normalization: expected one of 'ratio' or 'normalized', got 'normalised'"),
    ("    normalization: normalized\n", "", ":16:5", "claims[0].normalization: missing required key"),
    ("induction: [a1.h2, a1.h3]", "induction: [a1.h2, a1h3]", ":13:24", "circuit.roles.induction[1]: 'a1h3' is not a node name"),
    ("  - type: faithfulness\n    normalization: normalized", "  - type: faithfulnes\n    normalization: normalized", ":16:5", "claims[0]: unknown claim type 'faithfulnes'"),
    ("  name: induction\n", "  name: inductoin\n", ":7:9", "task.name: unknown task 'inductoin' (did you mean 'induction'?)"),
    ("    holds_from: 2000", "    holds_from: -5", ":24:17", "claims[1].holds_from: Input should be greater than or equal to 0"),
])
def test_mistakes_name_file_line_and_key(tmp_path, old, new, where, msg):
    assert old in VALID
    text, path = errors_of(tmp_path, VALID.replace(old, new, 1))
    assert text.startswith(path + where), text
    assert msg in text, text


def test_edges_are_checked_and_level_rules(tmp_path):
    bad_edge = VALID.replace("  roles:\n", "  edges: [a0.h1-a1.h2]\n  roles:\n")
    text, _ = errors_of(tmp_path, bad_edge)
    assert ":11:11: circuit.edges[0]: 'a0.h1-a1.h2' is not an edge" in text
    both = VALID.replace("  roles:\n", "  level: node\n  edges: ['a0.h1->a1.h2<k>']\n  roles:\n")
    assert "level 'node' takes nodes only" in errors_of(tmp_path, both)[0]


def test_yaml_level_errors(tmp_path):
    text, path = errors_of(tmp_path, VALID.replace("name: demo\n", "name: demo\nname: again\n"))
    assert text.startswith(path + ":2:1") and "duplicate key 'name'" in text
    text, path = errors_of(tmp_path, VALID.replace("[0, 2000]", "[0, 2000"))
    assert text.startswith(path + ":") and "YAML syntax error" in text
    assert "the spec file is empty" in errors_of(tmp_path, "")[0]
    assert "expected a mapping" in errors_of(tmp_path, "- a\n- b\n")[0]
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(tmp_path / "missing.circuit.yaml")


def test_all_problems_listed_one_per_line(tmp_path):
    text, _ = errors_of(tmp_path, VALID.replace("min: 0.8", "min: high").replace("ablation: corrupted", "ablation: nope"))
    lines = text.splitlines()
    assert len(lines) == 2 and any("ablation" in l for l in lines) and any("claims[0].min" in l for l in lines)


def test_yaml_booleans_and_dates_do_not_sneak_through(tmp_path):
    text, _ = errors_of(tmp_path, VALID.replace("name: demo", "name: no"))
    assert "name: expected a string, got False" in text
    ls = load_spec(write(tmp_path, VALID.replace("description: a demo spec", "description: 2024-01-01")))
    assert ls.spec.description == "2024-01-01"


def test_unsafe_yaml_tags_are_rejected(tmp_path):
    for tagged in ("!!python/object/apply:os.system ['true']", "!!python/name:os.system"):
        text, path = errors_of(tmp_path, VALID.replace("description: a demo spec", f"description: {tagged}"))
        assert text.startswith(path + ":2:14: description: unsupported YAML tag"), text


def test_schema_is_json_schema_with_all_sections():
    s = json_schema()
    assert s["title"] == "circuit_tests spec v1"
    assert {"model", "task", "circuit", "claims", "ablation"} <= set(s["properties"])
    assert s["additionalProperties"] is False


# ------------------------------------------------------------------ generated malformed specs

BASE = yaml.safe_load(VALID)
_JUNK = st.one_of(st.text(max_size=8), st.integers(-5, 5), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), max_size=2), st.none(), st.booleans())


def _paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


REQUIRED = [("name",), ("model",), ("model", "source"), ("task",), ("task", "name"), ("circuit",), ("claims",),
            ("claims", 0, "type"), ("claims", 0, "normalization"), ("claims", 0, "min")]
MAPPINGS = [(), ("model",), ("circuit",), ("claims", 0), ("claims", 1)]
TYPED = {("model", "source"): "str", ("claims", 0, "min"): "num", ("claims", 1, "holds_from"): "int",
         ("task", "batch_size"): "int", ("ablation",): "enum", ("claims", 0, "normalization"): "enum"}


def _get(d, path):
    for p in path[:-1]:
        d = d[p]
    return d, path[-1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_specs_always_give_located_spec_errors(tmp_path, data):
    """Each mutation is invalid by construction; loading must raise SpecError with file:line:col — never crash or pass."""
    import copy

    spec = copy.deepcopy(BASE)
    kind = data.draw(st.sampled_from(["delete_required", "unknown_key", "wrong_type"]))
    if kind == "delete_required":
        parent, key = _get(spec, data.draw(st.sampled_from(REQUIRED)))
        del parent[key]
    elif kind == "unknown_key":
        where = data.draw(st.sampled_from(MAPPINGS))
        parent = spec
        for p in where:
            parent = parent[p]
        key = data.draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10))
        if key in parent or key in {"id", "metric", "max", "max_kl", "min_effect", "holds_from", "revision", "checkpoints",
                                    "level", "roles", "nodes", "edges", "description", "version", "ablation"}:
            key = key + "_zz_unknown"
        parent[key] = data.draw(_JUNK)
    else:
        path = data.draw(st.sampled_from(sorted(TYPED)))
        parent, key = _get(spec, path) if path[:-1] != ("task",) else (spec["task"], path[-1])
        want = TYPED[path]
        bad = data.draw({"str": st.one_of(st.integers(), st.lists(st.integers(), min_size=1), st.booleans()),
                         "num": st.one_of(st.text(alphabet="xyz", min_size=1), st.lists(st.integers(), min_size=1)),
                         "int": st.one_of(st.text(alphabet="xyz", min_size=1), st.floats(0.1, 0.9)),
                         "enum": st.text(alphabet="qwx", min_size=1)}[want])
        parent[key] = bad
    p = tmp_path / "gen.circuit.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    for line in str(ei.value).splitlines():
        assert re.match(re.escape(str(p)) + r":\d+:\d+: \S", line), line


def test_role_score_and_path_ratio_claims_are_cross_checked(tmp_path):
    ok = VALID + (
        "  - type: role_score\n    role: induction\n    quantifier: at_least\n    k: 2\n    min: 0.5\n"
        "  - type: path_ratio\n    senders: previous_token\n    receivers: induction\n    input: k\n    min: 0.8\n")
    s = load_spec(write(tmp_path, ok)).spec
    assert [c.type for c in s.claims] == ["faithfulness", "faithfulness", "role_score", "path_ratio"]
    assert s.claims[3].senders == ["previous_token"]
    for old, new, msg in [
        ("role: induction", "role: mover", "claims[2].role: role 'mover' is not in circuit.roles (roles: induction, previous_token)"),
        ("k: 2", "k: 5", "claims[2].k: k = 5 but the role has 2 head(s)"),
        ("    k: 2\n", "", "k is required with quantifier 'at_least'"),
        ("receivers: induction", "receivers: movers", "claims[3].receivers: role 'movers' is not in circuit.roles"),
        ("    quantifier: at_least\n    k: 2\n", "    heads: [a0.h1]\n", "claims[2].heads[0]: a0.h1 is not a head of role 'induction'"),
        ("input: k", "input: x", "claims[3].input: expected one of 'q', 'k' or 'v', got 'x'"),
    ]:
        text, path = errors_of(tmp_path, ok.replace(old, new))
        assert text.startswith(path + ":") and msg in text, text
    text, _ = errors_of(tmp_path, ok.replace("role: induction", "role: previous_token").replace("previous_token: [a0.h1]", "previous_token: [a0.h1, m0]"))
    assert "m0 is not an attention head" in text


def test_committed_schema_is_current():
    """spec.schema.json (referenced by the specs' yaml-language-server header) matches the models."""
    import json
    from pathlib import Path

    committed = json.loads((Path(__file__).resolve().parents[1] / "spec.schema.json").read_text())
    assert committed == json_schema(), "regenerate with: circuit-tests schema > spec.schema.json"


def test_readme_spec_example_is_valid(tmp_path):
    """The spec shown in the README validates (and names heads that exist in the zoo ioi model)."""
    import re
    from pathlib import Path

    from circuit_tests.graph import Graph
    from circuit_tests.runner import circuit_for
    from circuit_tests.zoo import checkpoint_dirs

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = re.search(r"```yaml\n(# a shortened specs/ioi.circuit.yaml\n.*?)```", readme, re.S).group(1)
    loaded = load_spec(write(tmp_path, example))
    config = json.loads((checkpoint_dirs("ioi")[-1][1] / "config.json").read_text())
    assert circuit_for(loaded, Graph.from_hf_config(config)).nodes >= {"a0.h1", "a2.h0", "a1.h1"}
