"""Bad guidance arguments: one error type, raised early, naming the value and the fix."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mixture import clean_logits, ctx, denoiser, log_prob, points

from jaxdiff.diffusion import karras_sigmas
from jaxdiff.errors import InvalidArgumentError
from jaxdiff.guidance import (
    ag,
    apg,
    autoguidance,
    cfg,
    cfg_zero_star,
    cfgpp,
    classifier_guidance,
    elucd,
    eval_branches,
    gfcg,
    interval,
    interval_from_steps,
    minority,
    pag,
    rescale,
    slg,
    within_interval,
)
from jaxdiff.samplers import euler, sample

DEN = denoiser()
NAN, INF = float("nan"), float("inf")


def _bad_calls():
    """(call, regex the message must match): the value and the fix are in every message."""
    clf = dict(log_prob_fn=log_prob)
    return [
        (lambda: cfg(NAN), r"cfg: scale .*got nan; pass e\.g\. scale=2"),
        (lambda: cfg(np.array([1.0, INF])), r"scale .*an array with 1 bad entry, e\.g\. inf"),
        (lambda: cfgpp(INF), r"cfgpp: scale .*got inf"),
        (lambda: interval(NAN), r"interval: scale .*nan"),
        (lambda: interval(2.0, 1.0, 1.0), r"sigma_lo=1.0 >= sigma_hi=1.0"),
        (lambda: interval(2.0, -0.1, 1.0), r"sigma_lo .*>= 0.*got -0.1"),
        (lambda: interval(2.0, 0.1, NAN), r"sigma_hi .*got nan"),
        (lambda: within_interval(cfg(2.0), 3.0, 2.0), r"within_interval.*sigma_lo=3.0"),
        (lambda: rescale(2.0, phi=-0.1), r"rescale: phi .*>= 0.*got -0.1; pass e\.g\. phi=0.7"),
        (lambda: rescale(2.0, space="pixels"), r"space 'pixels'.*x0, eps, v, flow"),
        (lambda: apg(NAN), r"apg: scale .*nan"),
        (lambda: apg(2.0, r=-1.0), r"apg: r .*>= 0.*got -1.0; pass e\.g\. r=2.5"),
        (lambda: apg(2.0, r=NAN), r"apg: r .*got nan"),
        (lambda: apg(2.0, beta=1.0), r"apg: beta .*< 1.*got 1.0"),
        (lambda: apg(2.0, beta=-1.5), r"apg: beta .*> -1.*got -1.5"),
        (lambda: apg(2.0, eta=INF), r"apg: eta .*got inf"),
        (lambda: apg(2.0, axes=(0,)), r"apg: axes .*got 0"),
        (lambda: ag(INF), r"ag: scale .*got inf"),
        (lambda: ag(2.0, threshold=NAN), r"ag: threshold .*got nan; pass e\.g\. threshold=0.99"),
        (lambda: ag(2.0, threshold=np.ones(3)), r"ag: threshold must be a scalar.*\(3,\)"),
        (lambda: autoguidance(NAN, guide_denoise=DEN), r"autoguidance: scale .*nan"),
        (lambda: autoguidance(2.0, guide_denoise="small"), r"guide_denoise=.*got 'small'"),
        (lambda: classifier_guidance(NAN, **clf), r"classifier guidance: scale .*nan"),
        (lambda: classifier_guidance(1.0, **clf, base="both"), r"'uncond', 'cond', got 'both'"),
        (lambda: classifier_guidance(1.0, **clf, target=1.5), r"target .*got 1.5"),
        (lambda: classifier_guidance(1.0, **clf, target=-1), r"target .*got -1"),
        (lambda: minority(1.0, log_prob_fn=None), r"minority guidance needs log_prob_fn="),
        (lambda: minority(1.0, **clf, target=[1, -2]), r"minority guidance: target .*-2"),
        (lambda: elucd(1.0, logits_fn=clean_logits, temperature=0.0), r"temperature .*> 0"),
        (lambda: elucd(1.0, logits_fn=clean_logits, discount=-1.0), r"discount .*got -1.0"),
        (lambda: elucd(1.0, logits_fn=clean_logits, base="x"), r"elucd: base .*got 'x'"),
        (lambda: gfcg(INF, logits_fn=clean_logits), r"gfcg: scale .*got inf"),
        (lambda: gfcg(1.0, logits_fn=clean_logits, autoguide=2.0), r"autoguide .*got 2.0"),
        (lambda: cfg_zero_star(2.0, zero_init_steps=-1), r"zero_init_steps .*got -1"),
        (lambda: cfg_zero_star(2.0, zero_init_steps=1.5), r"zero_init_steps .*got 1.5"),
        (lambda: cfg_zero_star(2.0, use_zero_star="yes"), r"use_zero_star .*got 'yes'"),
        (lambda: pag(NAN), r"pag: pag_scale .*nan"),
        (lambda: slg(2.8, scale=INF), r"slg: scale .*inf"),
        (lambda: slg(2.8, start=-0.1), r"slg: start .*>= 0.*got -0.1"),
        (lambda: slg(2.8, start=0.5, stop=0.2), r"start <= stop.*start=0.5, stop=0.2"),
        (lambda: interval_from_steps(karras_sigmas(4), 3, 1), r"first=3, last=1"),
        (lambda: eval_branches(DEN, jnp.zeros((2, 2)), 1.0, (None, None)), r"cond= and uncond="),
    ]


def test_every_bad_argument_is_an_invalid_argument_error_with_value_and_fix():
    for make, match in _bad_calls():
        with pytest.raises(InvalidArgumentError, match=match):
            make()
    assert issubclass(InvalidArgumentError, ValueError)  # old `except ValueError` still works


def test_allowed_edge_values_build():
    assert apg(2.0, r=None).r is None and apg(2.0, r=0.0).r == 0.0 and apg(2.0, r=INF).r == INF
    assert interval(2.0, 0.0, INF).sigma_hi == INF
    assert ag(2.0, threshold=1.5).threshold == 1.5 and rescale(2.0, phi=1.0).phi == 1.0
    assert apg(2.0, axes=2).axes == (2,)
    assert classifier_guidance(1.0, log_prob_fn=log_prob, target=np.array([0, 2])) is not None


def test_traced_values_are_not_checked_at_build_time():
    # Inside jit a scale is a tracer: it cannot be inspected, so the factory accepts it.
    @jax.jit
    def build(w, r):
        return apg(w, r=r).scale + cfg(w).scale + interval(w, r, r + 1.0).inner.scale

    assert np.isnan(build(NAN, -1.0))


@pytest.mark.parametrize("which", ["gfcg", "minority", "classifier", "elucd"])
def test_label_methods_need_integer_cond_when_traced(which):
    x, c, u = points(4)
    make = {
        "gfcg": lambda: gfcg(1.0, logits_fn=clean_logits),
        "minority": lambda: minority(1.0, log_prob_fn=log_prob),
        "classifier": lambda: classifier_guidance(1.0, log_prob_fn=log_prob),
        "elucd": lambda: elucd(0.1, logits_fn=clean_logits),
    }[which]
    what = {"minority": "minority guidance", "classifier": "classifier guidance"}.get(which, which)

    def run(cond):
        def go(n):
            g = make()
            return sample(DEN, n, karras_sigmas(2), solver=euler(), guidance=g, cond=cond, uncond=u)

        return jax.jit(go)(x)

    for cond, got in [(None, "None"), (c.astype(jnp.float32), r"a float32 array of shape \(4,\)")]:
        with pytest.raises(InvalidArgumentError) as err:
            run(cond)
        want = f"{what} needs integer class labels in cond=, got {got}: pass cond="
        assert re.search(want, str(err.value)), str(err.value)
    out, _ = run(c)
    assert np.all(np.isfinite(out))


def test_a_target_replaces_the_cond_labels():
    x, _, u = points(4)
    for g in (
        minority(1.0, log_prob_fn=log_prob, target=2),
        classifier_guidance(1.0, log_prob_fn=log_prob, target=1),
    ):
        out, _ = g(DEN, x, ctx(1.3, 4), None, u, ())  # no cond needed
        assert np.all(np.isfinite(out.x0))
