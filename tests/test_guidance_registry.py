"""The guidance registry: every name builds from a string, resources, errors and the table."""

import inspect
import re
from pathlib import Path

import pytest

from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance import (
    GUIDANCE,
    REQUIRES,
    Guidance,
    autoguidance,
    classifier_guidance,
    elucd,
    gfcg,
    minority,
    parse_guidance,
    parse_spec,
    registry,
    slg,
)

DUMMY = {
    "guide_denoise": lambda x, sigma, cond: x,
    "log_prob_fn": lambda x, sigma, y: x[:, 0],
    "logits_fn": lambda x0: x0,
    "features_fn": lambda x0: x0.reshape(x0.shape[0], -1),
}

# Registry name -> class it builds: the table in the registry docstring and docs/guidance.md.
CLASSES = {
    "cfg": "CFG",
    "interval": "Interval",
    "rescale": "CFGRescale",
    "cfg_rescale": "CFGRescale",
    "apg": "APG",
    "ag": "AdaptiveGuidance",
    "autoguidance": "Autoguidance",
    "classifier": "ClassifierGuidance",
    "elucd": "EluCD",
    "gfcg": "GFCG",
    "minority": "MinorityGuidance",
    "cfgpp": "CFGPlusPlus",
    "cfg++": "CFGPlusPlus",
    "cfg_zero_star": "CFGZeroStar",
    "cfgzero*": "CFGZeroStar",
    "pag": "PerturbedGuidance",
    "slg": "PerturbedGuidance",
    "negtome": "NegToMe",
    "vendi": "VendiGuidance",
    "cvsg": "VendiGuidance",
}


def test_registry_parses_every_string_buildable_method():
    specs = {
        "cfg:2": "CFG",
        "interval:2,sigma_lo=0.3,sigma_hi=2": "Interval",
        "rescale:2,phi=0.5,space=x0": "CFGRescale",
        "apg:scale=3,eta=0,beta=-0.5": "APG",
        "apg:3,r=none": "APG",
        "ag:2,threshold=0.99": "AdaptiveGuidance",
        "cfgpp:0.6": "CFGPlusPlus",
        "cfg++:0.6": "CFGPlusPlus",
        "cfg_zero_star:2,zero_init_steps=2": "CFGZeroStar",
        "pag:3,scale=2": "PerturbedGuidance",
        "slg:2.8,start=0,stop=0.5": "PerturbedGuidance",
    }
    for spec, cls in specs.items():
        g = parse_guidance(spec)
        assert type(g).__name__ == cls and isinstance(g, Guidance), spec
    assert parse_guidance("apg:3,r=none").r is None
    assert parse_guidance("apg:scale=3,eta=0,beta=-0.5").beta == -0.5
    for name, needs in [
        ("autoguidance", "guide_denoise"),
        ("classifier", "log_prob_fn"),
        ("minority", "log_prob_fn"),
        ("elucd", "logits_fn"),
        ("gfcg", "logits_fn"),
    ]:
        assert name in GUIDANCE
        with pytest.raises(ValueError, match=needs):
            parse_guidance(f"{name}:2")
    with pytest.raises(ValueError, match="space"):
        parse_guidance("apg:2,space=pixels")
    with pytest.raises(ValueError, match="start"):
        slg(2.0, start=0.5, stop=0.1)


def test_every_registered_name_builds_from_a_string_with_its_resources():
    assert set(CLASSES) == set(GUIDANCE) == set(REQUIRES)
    for name in GUIDANCE:
        g = parse_guidance(f"{name}:1.5", **DUMMY)  # extra resources are ignored
        assert type(g).__name__ == CLASSES[name] and isinstance(g, Guidance), name
        if name == "interval":
            first = g.inner.scale
        elif name in ("pag", "slg"):
            first = g.perturb_scale
        elif name == "negtome":
            first = g.alpha
        else:
            first = g.scale
        assert first == 1.5, name  # the positional value is the factory's scale
        needs = {k: DUMMY[k] for k in REQUIRES[name]}
        assert type(parse_guidance(name, **needs)).__name__ == CLASSES[name]
        for field in needs:  # the callable really arrives in the object
            assert getattr(g, field) is DUMMY[field], (name, field)
    assert REQUIRES["autoguidance"] == ("guide_denoise",)
    assert REQUIRES["classifier"] == REQUIRES["minority"] == ("log_prob_fn",)
    assert REQUIRES["elucd"] == REQUIRES["gfcg"] == ("logits_fn",)
    assert REQUIRES["cfg"] == ()
    assert parse_guidance("none") is None and parse_guidance(" ") is None
    assert parse_guidance(None, **DUMMY) is None


@pytest.mark.parametrize(
    "name,resource,cli",
    [
        ("autoguidance", "guide_denoise", "guide=WORKDIR"),
        ("classifier", "log_prob_fn", "classifier=PATH"),
        ("minority", "log_prob_fn", "classifier=PATH"),
        ("elucd", "logits_fn", "classifier=PATH"),
        ("gfcg", "logits_fn", "classifier=PATH"),
    ],
)
def test_a_missing_resource_names_the_spec_the_resource_and_the_fix(name, resource, cli):
    spec = f"{name}:2"
    others = {k: v for k, v in DUMMY.items() if k != resource}
    with pytest.raises(InvalidArgumentError) as err:
        parse_guidance(spec, **others)
    msg = str(err.value)
    assert repr(spec) in msg and f"{resource}=" in msg and cli in msg, msg
    assert f"parse_guidance({spec!r}, {resource}=...)" in msg, msg
    with pytest.raises(InvalidArgumentError, match=f"{resource}=.*callable.*{cli}"):
        parse_guidance(f"{spec},{resource}=my_model")  # a string cannot be a callable


def test_required_callables_are_keyword_only_without_default():
    for factory, field in [
        (autoguidance, "guide_denoise"),
        (classifier_guidance, "log_prob_fn"),
        (minority, "log_prob_fn"),
        (elucd, "logits_fn"),
        (gfcg, "logits_fn"),
    ]:
        params = inspect.signature(factory).parameters
        assert list(params)[0] == "scale", factory
        assert params[field].kind is inspect.Parameter.KEYWORD_ONLY, factory
        assert params[field].default is inspect.Parameter.empty, factory
        with pytest.raises(TypeError):
            factory(2.0, DUMMY[field])  # the callable cannot be passed positionally
        with pytest.raises(InvalidArgumentError, match=f"{field}=.*None"):
            factory(2.0, **{field: None})


def test_parse_spec_is_generic_and_split_spec_checks_guidance_names():
    assert parse_spec("DDIM:0.5,s_noise=1e-3,flag=true,r=none,mode=fast") == (
        "ddim",
        [0.5],
        {"s_noise": 1e-3, "flag": True, "r": None, "mode": "fast"},
    )
    assert parse_spec("anything") == ("anything", [], {})
    assert parse_spec("x:guide=/runs/a:b") == ("x", [], {"guide": "/runs/a:b"})
    for spec, match in [
        (":2", "no name"),
        ("x:a=1,a=2", "'a' twice"),
        ("x:=1", "empty key"),
        ("x:a=1,2", "positional value '2' after key=value"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match):
            parse_spec(spec)
    assert registry.split_spec("CFG:2") == ("cfg", [2], {})
    with pytest.raises(InvalidArgumentError, match="unknown guidance 'cfgg'.*cfg, cfg\\+\\+"):
        registry.split_spec("cfgg:2")


def test_bad_spec_arguments_name_the_spec_the_value_and_the_fix():
    for spec, match in [
        ("cfg:2,sclae=3", "'cfg:2,sclae=3'.*sclae.*takes scale"),
        ("cfg:2,scale=3", "multiple values.*takes scale"),
        ("apg:2,eta=0,3", "positional value '3'"),
        ("classifier:1,base=both", "base must be one of 'uncond', 'cond', got 'both'"),
        ("cfg:nan", "'cfg:nan'.*scale.*finite.*got nan.*scale=2"),
        ("apg:3,r=-1", "r must be.*>= 0.*got -1.*r=2.5"),
        ("interval:2,sigma_lo=2,sigma_hi=1", "sigma_lo=2 >= sigma_hi=1.*sigma_lo < sigma_hi"),
        ("ag:2,threshold=inf", "threshold.*finite.*got inf.*threshold=0.99"),
        ("rescale:2,phi=1.5", "phi.*<= 1.*got 1.5.*phi=0.7"),
        ("cfg:strong", "scale must be a number.*got 'strong'"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match):
            parse_guidance(spec, **DUMMY)
    with pytest.raises(InvalidArgumentError, match="start"):
        slg(2.0, start=0.5, stop=0.1)


def _table_rows(text):
    """``(names, factory, class)`` from each row of a registry table (docstring or markdown)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip(" `") for c in re.split(r"\s{2,}|\|", line.strip()) if c.strip(" `")]
        if len(cells) >= 3 and cells[1] in {f.__name__ for f in GUIDANCE.values()}:
            names = [n.strip(" `") for n in cells[0].split(",")]
            rows.append((names, cells[1], cells[2].split()[0].strip("`")))
    return rows


@pytest.mark.parametrize("where", ["docstring", "docs"])
def test_the_alias_table_lists_every_name_with_its_factory_and_class(where):
    if where == "docstring":
        text = registry.__doc__
    else:
        text = (Path(__file__).parents[1] / "docs" / "guidance.md").read_text()
    seen = {}
    for names, factory, cls in _table_rows(text):
        for name in names:
            seen[name] = (factory, cls)
    want = {n: (f.__name__, CLASSES[n]) for n, f in GUIDANCE.items()}
    assert seen == want
