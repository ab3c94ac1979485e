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
    # the two declared claims, then a role check per role with a criterion, located at its role's line
    assert s.circuit.resolved_level == "node" and s.claim_ids() == ["faithfulness", "ratio", "role_check_previous_token",
                                                                    "role_check_induction"]
    assert ls.line_of("claims", 1) == 19 and ls.where("circuit", "roles", "induction", 1).endswith(":13:24")
    assert ls.line_of("claims", 2) == 12 and ls.line_of("claims", 3) == 13


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
    assert [c.type for c in s.claims] == ["faithfulness", "faithfulness", "role_score", "path_ratio", "role_check",
                                          "role_check"]
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


# ---------------------------------------------------------------------------------------------- one name grammar

@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from(["q", "k", "v", None]))
def test_names_format_and_parse_round_trip(layer, head, qkv):
    from circuit_tests import names

    h = names.head_name(layer, head)
    assert names.parse_head(h) == (layer, head) and str(names.parse_node(h)) == h
    assert str(names.parse_node(names.mlp_name(layer))) == f"m{layer}"
    node, got = names.parse_receiver(names.receiver_name(h, qkv))
    assert (str(node), got) == (h, qkv)
    s, r, q = names.parse_edge(names.edge_name(names.mlp_name(layer), names.receiver_name(h, qkv)))
    assert (str(s), str(r), q) == (f"m{layer}", h, qkv)


def test_every_parser_shares_the_grammar():
    """graph, path patching and role-score measures reject what the spec rejects (they used to disagree:
    one accepted <qk>, one accepted a00.h03 and then dropped it)."""
    from circuit_tests import names
    from circuit_tests.errors import GraphError
    from circuit_tests.graph import Graph
    from circuit_tests.measures import _head
    from circuit_tests.path_patching import Receivers

    g = Graph(3, 4, parallel=False)
    for bad in ("a00.h1", "a\uff11.h2", "a1.h2 ", "A1.H2"):
        with pytest.raises(GraphError, match="did you mean"):
            g.check_node(bad)
        with pytest.raises(GraphError, match="did you mean"):
            _head(bad)
        with pytest.raises(GraphError):
            g.parse_edge(f"input->{bad}")
    with pytest.raises(GraphError, match="a1.h2<q> and a1.h2<k>"):
        Receivers.parse(["a1.h2<qk>"])
    assert Receivers.parse(["a1.h2<q>", "a1.h3"]).heads == ((1, 2, "q"), (1, 3, "k"), (1, 3, "q"), (1, 3, "v"))
    assert g.parse_edge("a0.h1 -> a1.h2<k>") == [("a0.h1", "a1.h2<k>")]
    with pytest.raises(GraphError, match="receives nothing"):
        names.parse_receiver("input")
    with pytest.raises(GraphError, match="logits sends to nothing"):
        g.parse_edge("logits->m2")


# ---------------------------------------------------------------------------------------------- schema, CLI

def test_schema_names_every_task_and_its_parameters():
    from circuit_tests.tasks import TASKS

    schema = json_schema()
    task = schema["properties"]["task"]
    assert task["discriminator"]["propertyName"] == "name"
    assert set(task["discriminator"]["mapping"]) == set(TASKS)
    for name, t in TASKS.items():
        variant = schema["$defs"][f"Task_{name}"]
        assert variant["properties"]["name"]["const"] == name and variant["additionalProperties"] is False
        assert set(t.params.model_fields) | {"name", "batch_size", "prepend_bos"} == set(variant["properties"])


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
    from circuit_tests.cli import main

    bad = write(tmp_path, VALID.replace("[a0.h1]", "[a00.h1]"))
    assert main(["scores", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"circuit-tests: error: {re.escape(str(bad))}:12:\d+: .*did you mean 'a0.h1'", err[0])
    assert main(["scores", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read spec file" in capsys.readouterr().err
    (tmp_path / "r.json").write_text('{"records": [')
    assert main(["plot", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("circuit-tests: error: ")


def test_shipped_specs_validate_against_the_committed_schema():
    """What editors see (spec.schema.json) accepts every shipped spec and rejects a misspelt task parameter."""
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    validator = jsonschema.Draft202012Validator(json.loads((root / "spec.schema.json").read_text()))
    specs = sorted((root / "specs").rglob("*.circuit.yaml"))
    assert specs
    for p in specs:
        data = yaml.safe_load(p.read_text())
        assert not list(validator.iter_errors(data)), p
        load_spec(p)  # and the loader agrees
    data = yaml.safe_load(specs[0].read_text())
    data["task"]["sizee"] = 3
    assert list(validator.iter_errors(data))


README_BAD_IOI = """\
name: ioi-zoo
model:
  source: zoo:ioi
  checkpoints: "0-100000000000:1"
task:
  name: ioi
  size: 64
  seed: 0
  batch_size: 32
  corruptoin: s2_io_flip
circuit:
  roles:
    copy_suppression: [a00.h1, a2.h0, a2.h1]
    name_mover: [a1.h0, a1.h1, a1.h3]
claims:
  - type: faithfulness
    normalization: normalized
    min: "0.8"
  - type: role_score
    role: copy_suppression
    min: 0.4
"""
README_BAD_TASK = """\
name: x
model: {source: zoo:induction}
task: {name: induction, size: 8}
circuit:
  roles:
    name_mover: [a1.h0]
claims:
  - {type: role_score, role: name_mover, min: 40}
"""


def test_readme_error_examples_are_what_the_loader_says(tmp_path):
    """The README's error block shows real messages: these files reproduce them verbatim (structure errors
    first; once fixed, the task-parameter and cross-checks)."""
    from pathlib import Path

    from circuit_tests.spec import loads_spec

    def said(text, name):
        try:
            loads_spec(text, name)
        except SpecError as e:
            return str(e).splitlines()
        return []

    out = said(README_BAD_IOI, "ioi.circuit.yaml")
    fixed = README_BAD_IOI.replace("a00.h1", "a0.h1").replace('"0.8"', "0.8").replace('"0-100000000000:1"', "all")
    out += said(fixed, "ioi.circuit.yaml") + said(README_BAD_TASK, "task.circuit.yaml")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = [ln for ln in readme.splitlines() if re.match(r"^(ioi|task)\.circuit\.yaml:\d+:\d+: ", ln)]
    reproduced = [ln for ln in shown if ln in out]
    assert len(reproduced) == len(out) >= 6, (shown, out)
    for ln in out:
        assert ln in shown, f"loader message not in the README example block: {ln}"
