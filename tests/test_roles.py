"""Roles earned by measurement: the criteria against the zoo models' known heads, the implicit role checks of a
spec (a mislabel fails even where a ``quantifier: any`` role score passes), and ``circuit-tests roles``."""

from __future__ import annotations

import pytest

import circuit_tests
from circuit_tests import cli
from circuit_tests.errors import SpecError
from circuit_tests.roles import ATTENTION_FLOOR, COPY_THRESHOLD, ROLE_CRITERIA, check_roles
from circuit_tests.spec import loads_spec

IND = """\
name: ind
model:
  source: zoo:induction
  checkpoints: [3000]
task:
  name: induction
  size: 8
  seed: 0
  seq_len: 20
circuit:
  roles:
    previous_token: {prev}
    induction: {ind}
claims:
  - type: role_score
    id: some_previous_token_head
    role: previous_token
    quantifier: any
    min: 0.5
"""

IOI = """\
name: ioi
model:
  source: zoo:ioi
  checkpoints: [2500]
task:
  name: ioi
  size: 64
  seed: 0
  corruption: s2_io_flip
circuit:
  roles:
    copy_suppression: [a0.h1, a2.h0, a2.h1]
    name_mover: {nm}
claims:
  - type: role_score
    id: some_name_mover_copies
    role: name_mover
    quantifier: any
    min: 9
"""


def _run(tmp_path, text):
    p = tmp_path / "s.circuit.yaml"
    p.write_text(text)
    return {r.claim: r for r in circuit_tests.run(p)}


def test_true_labels_are_earned_and_swapped_labels_fail(tmp_path):
    """The zoo induction model at step 3000: a0.h3 is its previous-token head and layer 1 holds the induction heads
    (docs/zoo.md). Swapping the two roles' labels fails both role checks, head by head."""
    recs = _run(tmp_path, IND.format(prev="[a0.h3]", ind="[a1.h0, a1.h1, a1.h2, a1.h3]"))
    assert recs["role_check_previous_token"].outcome == "passed" and recs["role_check_previous_token"].value == 1.0
    assert recs["role_check_induction"].outcome == "passed"
    assert recs["role_check_induction"].extra["earned"] == "4 of 4"
    swapped = _run(tmp_path, IND.format(prev="[a1.h1, a1.h2]", ind="[a0.h3]"))
    for cid in ("role_check_previous_token", "role_check_induction"):
        assert swapped[cid].outcome == "failed" and swapped[cid].value == 0.0, swapped[cid].reason
    per_head = swapped["role_check_induction"].extra["per_head"]["a0.h3"]
    assert per_head["earned"] is False and per_head["score"] < ATTENTION_FLOOR


def test_a_mislabel_fails_its_role_check_where_any_passes(tmp_path):
    """The issue's failure: a role whose other members do not do the job passes a `quantifier: any` role score; the
    role check names the heads that did not earn the label, and the role score says how many reached its min."""
    recs = _run(tmp_path, IND.format(prev="[a0.h3, a1.h1]", ind="[a1.h0, a1.h2, a1.h3]"))
    any_claim = recs["some_previous_token_head"]
    assert any_claim.outcome == "passed" and any_claim.extra["earned"] == "1 of 2"
    check = recs["role_check_previous_token"]
    assert check.outcome == "failed" and check.value == 0.5
    assert "a1.h1" in check.reason and "1 of 2 labelled heads earned" in check.reason
    assert check.extra["per_head"]["a0.h3"]["earned"] is True


def test_copy_roles_on_the_zoo_ioi_model(tmp_path):
    """zoo:ioi at step 2500: a0.h1, a2.h0, a2.h1 suppress the repeated name (negative copy score > 10 %, they attend
    S2); the layer-1 name-raising heads attend no name at END, so labelling them name movers fails, even though one
    of them copies at 9.9 % and passes an `any` role score with min 9."""
    recs = _run(tmp_path, IOI.format(nm="[a1.h0, a1.h1, a1.h3]"))
    cs = recs["role_check_copy_suppression"]
    assert cs.outcome == "passed", cs.reason
    assert all(v["copy"] > COPY_THRESHOLD for v in cs.extra["per_head"].values())
    assert recs["some_name_mover_copies"].outcome == "passed"
    nm = recs["role_check_name_mover"]
    assert nm.outcome == "failed" and nm.value == 0.0
    assert "IO is not the largest" in nm.reason


def test_criteria_without_their_inputs_are_not_evaluated(tmp_path):
    """An IOI criterion on the induction task cannot be judged: not_evaluated with the reason, never a pass."""
    text = IND.format(prev="[a0.h3]", ind="[a1.h1]").replace("    induction: [a1.h1]\n",
                                                               "    induction: [a1.h1]\n    name_mover: [a1.h2]\n")
    recs = _run(tmp_path, text)
    r = recs["role_check_name_mover"]
    assert r.measured == "not_evaluated" and r.outcome == "skipped" and "IO/S1/S2" in r.reason


def test_implicit_role_checks_in_the_spec(tmp_path):
    """One role check per role with a criterion, located at the role's line; an explicit role_check replaces the
    implicit one of its role (and sets its own holds_from); roles without a criterion are not checked."""
    p = tmp_path / "s.circuit.yaml"
    text = IND.format(prev="[a0.h3]", ind="[a1.h1]").replace("circuit:\n  roles:\n",
                                                              "circuit:\n  roles:\n    my_group: [a0.h0]\n")
    text += "role_checks:\n  holds_from: 100\n  \n"
    loaded = loads_spec(text, p)
    ids = loaded.spec.claim_ids()
    assert ids == ["some_previous_token_head", "role_check_previous_token", "role_check_induction"]
    assert [c.holds_from for c in loaded.spec.claims[1:]] == [100, 100]
    lines = text.splitlines()
    assert lines[loaded.line_of("claims", 1) - 1].strip().startswith("previous_token:")  # located at the role
    assert lines[loaded.line_of("claims", 2) - 1].strip().startswith("induction:")
    explicit = text.replace("claims:\n", "claims:\n  - type: role_check\n    role: induction\n    holds_from: 7\n")
    loaded = loads_spec(explicit, p)
    assert loaded.spec.claim_ids() == ["role_check_induction", "some_previous_token_head", "role_check_previous_token"]
    assert loaded.spec.claims[0].holds_from == 7 and not loaded.is_implicit(0) and loaded.is_implicit(2)


@pytest.mark.parametrize("role, msg", [("my_group", "has no criterion"), ("nope", "is not in circuit.roles")])
def test_role_check_on_a_role_without_criterion_is_a_located_error(tmp_path, role, msg):
    text = IND.format(prev="[a0.h3]", ind="[a1.h1]").replace("circuit:\n  roles:\n",
                                                              "circuit:\n  roles:\n    my_group: [a0.h0]\n")
    text = text.replace("claims:\n", f"claims:\n  - type: role_check\n    role: {role}\n")
    with pytest.raises(SpecError, match=rf"s.circuit.yaml:\d+:\d+: claims\[0\].role: .*{msg}"):
        loads_spec(text, tmp_path / "s.circuit.yaml")


def test_check_roles_names_an_mlp_under_a_role():
    from tests.helpers import tiny_bridge

    ev = check_roles(tiny_bridge("gpt2"), object(), {"induction": ["m0"]})
    v = ev.verdicts[("induction", "m0")]
    assert v.earned is False and "not an attention head" in v.why


def test_every_criterion_is_documented():
    text = (__import__("pathlib").Path(__file__).parents[1] / "docs" / "roles.md").read_text()
    for role in ROLE_CRITERIA:
        assert f"| `{role}` |" in text


def test_roles_command_labels_from_measurements(tmp_path, capsys):
    """`circuit-tests roles` on the mislabelled zoo IOI spec: the copy suppressors are labelled, the layer-1 heads are
    reported NOT earned as name movers, and the exit code says a label is wrong."""
    p = tmp_path / "s.circuit.yaml"
    p.write_text(IOI.format(nm="[a1.h0, a1.h1, a1.h3]"))
    assert cli.main(["roles", str(p)]) == 1
    out = capsys.readouterr().out
    assert "copy_suppression: [a0.h1, a2.h0, a2.h1]" in out
    assert "a1.h0    name_mover: NOT earned" in out
    assert "nodes: [a1.h0, a1.h1, a1.h3]" in out
    p.write_text(IOI.format(nm="[a1.h0]").replace("    name_mover: [a1.h0]\n", "").replace(
        "role: name_mover\n    quantifier: any\n    min: 9", "role: copy_suppression\n    min: 10"))
    assert cli.main(["roles", str(p)]) == 0
